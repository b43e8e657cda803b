"""The plain training step: one batch's diffusion loss, backward and AdamW update, in ``lamamba train``'s precision,
without DeepSpeed, data loader, EMA or non-finite check.

``lamamba bench`` (lamamba_dist/bench/model.py) times it, ``lamamba parity`` (lamamba_dist/parity.py) trains with
it. The trainer's own step is ``Trainer.queue_step`` (lamamba_dist/train/trainer.py): the same model boundary and
loss (:func:`model_boundary`, :func:`diffusion_loss`), with DeepSpeed's optimizer and the trainer's parts around it; ``lamamba bench train`` times that one, and scripts/gpu_check.sh sets the two against each other.

Precisions (``[train] precision``, lamamba_dist/config.py):

* ``bf16``: bf16 weights, an fp32 master copy of them in one flat tensor that AdamW steps (:class:`Bf16MasterWeights`,
  as DeepSpeed's bf16 mode with the trainer's fused gradient reduction); the model's input is cast to bf16 and its
  output back to fp32, so the diffusion math (q_sample, MSE and VLB terms) stays fp32;
* ``bf16_autocast``: fp32 weights under ``torch.autocast(bfloat16)``;
* ``fp32``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lamamba_dist.models.compile import step_begin

PRECISIONS = ("bf16", "bf16_autocast", "fp32")


def model_boundary(forward: Callable, dtype: torch.dtype, cudagraphs: bool = False) -> Callable:
    """``forward`` at the model boundary of a training step: input in the weights' ``dtype``, output in fp32
    (the diffusion loss is computed in fp32, under autocast too). ``cudagraphs``: the model's compiled blocks
    replay as CUDA graphs, and every forward (one per micro-batch) first marks a new step for them
    (lamamba_dist/models/compile.py ``step_begin``)."""

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        if cudagraphs:
            step_begin()
        return forward(x.to(dtype), t, **kwargs).float()

    return call


def diffusion_loss(diffusion, forward: Callable, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The training loss of one batch (the mean over its samples of the diffusion's MSE + VLB terms, fp32):
    ``forward`` is the model at its boundary (:func:`model_boundary`)."""
    return diffusion.training_losses(forward, x0, t, model_kwargs={"y": y}, noise=noise)["loss"].float().mean()


class Bf16MasterWeights:
    """The optimizer side of ``lamamba train``'s default precision (DeepSpeed's bf16 mode) for a plain loop: the
    model's weights in bf16, an fp32 master copy of them in one flat tensor that AdamW steps, and after the step
    the master copied back into the bf16 weights. As in DeepSpeed's ZeRO-1/2 path with the trainer's fused
    gradient reduction (lamamba_dist/train/ds_internals.py): one step's bf16 gradients are flattened into one
    buffer and converted to fp32 for the update."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, fused: bool,
                 betas: tuple = (0.9, 0.999)):
        model.to(torch.bfloat16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.master = torch.nn.Parameter(torch._utils._flatten_dense_tensors([p.detach().float() for p in self.params]))
        self.views = torch._utils._unflatten_dense_tensors(self.master.detach(), self.params)
        self.opt = torch.optim.AdamW([self.master], lr=lr, weight_decay=weight_decay, betas=tuple(betas), fused=fused)

    def step(self, loss: torch.Tensor) -> None:
        grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        self.master.grad = torch._utils._flatten_dense_tensors(grads).float()
        del grads
        self.opt.step()
        self.master.grad = None
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views)


class TrainStep:
    """``step(x0, t, y, noise=None) -> loss``: one optimizer step of ``model`` on the batch ``x0`` (latents), ``t``
    (timesteps), ``y`` (labels), with ``noise`` drawn by the diffusion when None. Returns the batch's mean loss
    (detached). Build it before compiling the model's blocks: ``bf16`` casts the weights to bf16 in place.
    ``cudagraphs``: the blocks were compiled to replay as CUDA graphs (see :func:`model_boundary`)."""

    def __init__(self, model: torch.nn.Module, diffusion, precision: str, *, lr: float = 1e-4,
                 weight_decay: float = 0.0, betas: tuple = (0.9, 0.999), fused: Optional[bool] = None,
                 cudagraphs: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        device = next(model.parameters()).device
        fused = device.type == "cuda" if fused is None else fused
        self.model, self.diffusion, self.precision = model, diffusion, precision
        self.master = Bf16MasterWeights(model, lr, weight_decay, fused, betas) if precision == "bf16" else None
        self.opt = None
        if self.master is None:
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                                         fused=fused)
        self.forward = model_boundary(model, torch.bfloat16 if precision == "bf16" else torch.float32, cudagraphs)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16_autocast")

    def loss(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, noise: Optional[torch.Tensor] = None):
        with self.autocast:
            return diffusion_loss(self.diffusion, self.forward, x0, t, y, noise)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = self.loss(x0, t, y, noise)
        if self.master is not None:
            self.master.step(loss)
        else:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()
