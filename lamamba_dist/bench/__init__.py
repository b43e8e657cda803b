"""The benchmarks, all behind ``lamamba bench WHAT ...`` (lamamba_dist/cli.py ``BENCHES``), each writing one JSON
file with the same environment block (common.py):

* ``model`` (model.py, the default WHAT): the plain training step (lamamba_dist/train/step.py) of several models
  in one process;
* ``train`` (train.py, with matrix.py and fit.py): the trainer's own step, ``Trainer.queue_step``, for a matrix of
  configurations in one launch, and the largest micro-batch that fits;
* ``sample`` (sample.py): DDPM with classifier-free guidance, as ``lamamba sample`` runs it;
* ``loader`` (loader.py): the latent loader's samples/s per worker;
* ``vae`` (vae.py): the preprocessing VAE's encode throughput (lamamba_dist/data_pipeline/vae.py);
* ``kernels`` (kernels.py): the selective-scan kernels of SS2D by backend, on one GPU;
* ``scaling`` (scaling.py): the markdown tables of docs/scaling.md from ``train`` JSON files.

profiling.py times where a step's host and device time go, for the model and train benches alike.
Importing this package imports no torch (``lamamba bench train`` reads its matrix before DeepSpeed starts).
"""
