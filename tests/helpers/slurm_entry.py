"""Training entry point for the Slurm preemption drill (tests/cluster/test_slurm_cluster.py).

The real trainer, slowed down by ``LAMAMBA_DRILL_STEP_SLEEP`` seconds per step so that preemptions and the time
limit land mid-run however fast the machine is. The sleep goes through the trainer's per-step test hook
(``trainer._fault("step", step)``) and touches nothing numeric: the drill compares its final weights with an
unthrottled run. Imported inside the Slurm job (the drill exports PYTHONPATH=tests/).
"""

from __future__ import annotations

import os
import time


def run_training(cfg) -> int:
    from lamamba_dist.train import trainer

    sleep = float(os.environ.get("LAMAMBA_DRILL_STEP_SLEEP", "0"))
    hook = getattr(trainer, "_fault", None)
    if hook is None:  # fail loudly rather than run an unthrottled (flaky) drill
        raise RuntimeError("lamamba_dist.train.trainer._fault (the per-step test hook) is gone; update tests/helpers/slurm_entry.py")

    def throttled(point: str, step: int) -> None:
        if point == "step" and sleep > 0:
            time.sleep(sleep)
        hook(point, step)

    trainer._fault = throttled
    try:
        return trainer.run_training(cfg)
    finally:
        trainer._fault = hook
