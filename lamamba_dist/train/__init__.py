"""DeepSpeed ZeRO training of LaMamba-Diff / DiT with fault-tolerant checkpoints.

Public contract (used by ``cluster/`` and the CLI):

* :func:`run_training` ``(cfg: ExperimentConfig) -> int`` trains in-process. It reads the distributed
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) set by torchrun,
  the deepspeed launcher or submitit, resumes from the newest complete checkpoint under
  ``cfg.checkpoint.dir`` by itself, and returns an exit code:

  - :data:`EXIT_OK` (0): ``train.steps`` reached, final checkpoint written.
  - :data:`EXIT_REQUEUE` (3): a stop was requested (SIGUSR2, SIGTERM or :func:`request_stop`); every rank
    saved a complete checkpoint at the next step boundary. The job should be requeued; rerunning the same
    command continues exactly.
  - :data:`EXIT_FAILURE` (1): training could not continue (e.g. non-finite losses persisted after rollbacks).

* :func:`request_stop` asks the running loop to save and return :data:`EXIT_REQUEUE` at the next step
  boundary (safe to call from a signal handler or another thread, e.g. a submitit ``checkpoint()`` hook).

Nothing here imports deepspeed, wandb or the model at import time.
"""

from __future__ import annotations

from lamamba_dist.train.signals import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REQUEUE,
    clear_stop_request,
    request_stop,
    stop_requested,
)

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_REQUEUE",
    "request_stop",
    "stop_requested",
    "clear_stop_request",
    "run_training",
]


def run_training(cfg, move_damaged_aside: bool = False) -> int:
    """Train (or resume) the experiment ``cfg``; see the module docstring for the exit codes.

    Step folders of which none verifies stop training with an error, unless ``move_damaged_aside`` (they are then
    moved to ``[checkpoint] dir/damaged/`` and training starts at step 0)."""
    from lamamba_dist.train.trainer import run_training as _run

    return _run(cfg, move_damaged_aside=move_damaged_aside)
