"""The callable that submitit runs on every Slurm task: distributed setup, training, preemption and requeue.

One ``TrainJob`` is pickled once at submission; Slurm starts it on every task (one per GPU), again after every
requeue. Each run ("incarnation") of the job:

1. exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the Slurm environment (through
   submitit's ``TorchDistributedEnvironment``; the port depends on the job id *and* the restart count so that a
   requeued run never collides with the previous run's socket);
2. installs a SIGUSR2/SIGTERM handler that only calls :func:`lamamba_dist.train.request_stop` (submitit's own
   handler would checkpoint and requeue from inside the signal handler on rank 0 alone, killing the job before
   the collective save);
3. calls the trainer, which resumes from the newest complete checkpoint under ``[checkpoint] dir``;
4. on ``EXIT_REQUEUE`` (every rank saved at a step boundary) rank 0 decides, in :meth:`TrainJob.checkpoint`
   (submitit's ``Checkpointable`` protocol), whether the job comes back:

   - preempted (``scontrol show job`` has a ``PreemptTime``), time limit, or a manual ``scancel --signal USR2``:
     rank 0 runs ``scontrol requeue`` (Slurm's PreemptMode=REQUEUE only requeues a job it had to kill; one that
     saved and ended within its GraceTime would count as completed);
   - the requeue limit (``SLURM_RESTART_COUNT >= max_requeues``) or ``lamamba cancel --save`` reached: no requeue;
     rerunning ``lamamba submit`` resumes. (A run that Slurm requeued by itself past the limit, e.g. a preempted
     job it had to kill after GraceTime, ends at start without training.)

Rank 0 appends one JSON line per event to ``JOB_DIR/events.jsonl`` (start, stop, requeue, finished, failed).
"""

from __future__ import annotations

import importlib
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

STOP_FILE = "STOP"  # written by `lamamba cancel --save`: save, then do not requeue
EVENTS_FILE = "events.jsonl"
DEFAULT_ENTRY = "lamamba_dist.train:run_training"


def restart_count() -> int:
    """How many times Slurm has restarted (requeued) this job so far."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def master_port(job_id: str, restarts: int) -> int:
    """A port in [20000, 60000) that differs between the runs of one job and between jobs."""
    return random.Random(f"lamamba/{job_id}/{restarts}").randrange(20000, 60000)


def export_dist_env() -> dict[str, str]:
    """Set the torch.distributed ``env://`` variables of this task from Slurm; returns them."""
    from submitit.helpers import TorchDistributedEnvironment

    d = TorchDistributedEnvironment()
    job_id = os.environ.get("SLURM_JOB_ID", "0")
    env = {
        "MASTER_ADDR": d.master_addr,
        "MASTER_PORT": str(master_port(job_id, restart_count())),
        "RANK": str(d.rank),
        "WORLD_SIZE": str(d.world_size),
        "LOCAL_RANK": str(d.local_rank),
        "LOCAL_WORLD_SIZE": str(d.local_world_size),
    }
    # CUDA_VISIBLE_DEVICES is left as Slurm set it: the trainer picks cuda:LOCAL_RANK among the node's GPUs.
    os.environ.update(env)
    return env


def load_entry(entry: str) -> Callable[[Any], int]:
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name or "run_training")


class TrainJob:
    """submitit callable (``Checkpointable`` protocol: ``__call__`` + ``checkpoint()``) training one experiment.

    ``cfg`` is the resolved :class:`lamamba_dist.config.ExperimentConfig`, pickled at submission so that later
    edits of the TOML file do not change a running job. ``entry`` names the training function
    (``module:function``, ``fn(cfg) -> exit code``).
    """

    def __init__(self, cfg: Any, job_dir: str, max_requeues: int, time_min: int, signal_delay_s: int = 120,
                 entry: str = DEFAULT_ENTRY) -> None:
        self.cfg = cfg
        self.job_dir = str(job_dir)
        self.max_requeues = int(max_requeues)
        self.time_min = int(time_min)
        self.signal_delay_s = int(signal_delay_s)
        self.entry = entry
        self._signals: list[str] = []
        self._started = 0.0

    # ------------------------------------------------------------------ pickling: no run-time state
    def __getstate__(self) -> dict:
        st = dict(self.__dict__)
        st["_signals"], st["_started"] = [], 0.0
        return st

    # ------------------------------------------------------------------ helpers
    @property
    def rank(self) -> int:
        return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))

    @property
    def job_id(self) -> str:
        return os.environ.get("SLURM_JOB_ID", "")

    def event(self, kind: str, **info: Any) -> None:
        """Rank 0: append one JSON line to JOB_DIR/events.jsonl and echo it to the rank's log."""
        if self.rank != 0:
            return
        rec = {"time": round(time.time(), 3), "event": kind, "job_id": self.job_id, "restart": restart_count(),
               "host": socket.gethostname(), **info}
        line = json.dumps(rec, sort_keys=True)
        print(f"[lamamba cluster] {line}", file=sys.stderr, flush=True)
        path = Path(self.job_dir) / EVENTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _on_signal(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal API
        from lamamba_dist.train.signals import request_stop  # already imported by __call__: no import here

        name = signal.Signals(signum).name
        self._signals.append(name)
        request_stop(f"Slurm sent {name}")

    def stop_reason(self) -> str:
        """Why the trainer was stopped: 'preempted', 'time limit', 'cancel --save' or 'signal'."""
        if (Path(self.job_dir) / STOP_FILE).exists():
            return "cancel --save"
        from lamamba_dist.cluster import slurm

        rec = None
        try:
            rec = slurm.show_job(self.job_id) if self.job_id else None
        except slurm.SlurmError:
            pass
        if rec and rec.get("PreemptTime", "None") not in ("None", "", "Unknown"):
            return "preempted"
        if rec:
            limit = slurm.parse_time_limit(rec.get("TimeLimit", ""))
            run = slurm.parse_time_limit(rec.get("RunTime", "0"))
            if limit is not None and run is not None and (limit - run) * 60 <= self.signal_delay_s + 120:
                return "time limit"
        return "signal"

    # ------------------------------------------------------------------ submitit's Checkpointable protocol
    def checkpoint(self, *args: Any, **kwargs: Any):
        """Ask every rank to save at the next step boundary; return the resubmission, or None past the limit.

        submitit calls this from its signal handler; :meth:`__call__` calls it after the trainer saved. The
        resubmission is this same object: all run-time state is in the checkpoint folder and in Slurm's
        restart count.
        """
        from submitit.helpers import DelayedSubmission

        from lamamba_dist.train import request_stop

        request_stop("checkpoint()")
        if (Path(self.job_dir) / STOP_FILE).exists() or restart_count() >= self.max_requeues:
            return None
        return DelayedSubmission(self, *args, **kwargs)

    # ------------------------------------------------------------------ the job
    def __call__(self) -> dict:
        self._started = time.time()
        import lamamba_dist.train.signals  # noqa: F401 - before the handler can run (no import inside a handler)

        for s in (signal.SIGUSR2, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        env = export_dist_env()
        # every rank says where it runs (its own log): the first thing to read when ranks do not meet
        print(f"[lamamba cluster] rank {env['RANK']} of {env['WORLD_SIZE']} on {socket.gethostname()} "
              f"(node {os.environ.get('SLURM_NODEID', '?')}, LOCAL_RANK {env['LOCAL_RANK']} of "
              f"{env['LOCAL_WORLD_SIZE']}), master {env['MASTER_ADDR']}:{env['MASTER_PORT']}",
              file=sys.stderr, flush=True)
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        if restart_count() > self.max_requeues:
            # Slurm requeued the job by itself (a preempted job it had to kill, a node failure) past the limit.
            self.event("not_requeued", reason=f"requeue limit exceeded ({restart_count()} of --max-requeues "
                                              f"{self.max_requeues}); not training")
            raise RuntimeError(f"requeue limit exceeded ({restart_count()} > --max-requeues {self.max_requeues}); "
                               "rerun the same `lamamba submit` command to continue")
        self.event("start", world_size=int(env["WORLD_SIZE"]), master=f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                   checkpoint_dir=self.cfg.checkpoint.dir)
        from lamamba_dist.train import EXIT_OK, EXIT_REQUEUE

        train = load_entry(self.entry)
        try:
            rc = train(self.cfg)
        except BaseException as e:
            self.event("failed", error=f"{type(e).__name__}: {e}")
            raise
        if rc == EXIT_OK:
            self.event("finished", seconds=round(time.time() - self._started, 1))
            return {"status": "finished", "job_id": self.job_id, "restarts": restart_count(),
                    "checkpoint_dir": self.cfg.checkpoint.dir}
        if rc != EXIT_REQUEUE:
            self.event("failed", exit_code=rc)
            raise RuntimeError(f"training returned exit code {rc}; see this job's logs in {self.job_dir}")
        # Every rank has saved a complete checkpoint (the trainer's save ends with a barrier).
        if self.rank == 0:
            self._after_save()
        if (Path(self.job_dir) / STOP_FILE).exists():
            return {"status": "stopped", "job_id": self.job_id, "restarts": restart_count(),
                    "checkpoint_dir": self.cfg.checkpoint.dir}
        # Leave without a result file (submitit's convention for a requeued job): the next run writes it.
        # Exit status 0, not EXIT_REQUEUE: srun runs with --kill-on-bad-exit, and a rank leaving with a
        # non-zero status would kill rank 0 before it has requeued the job.
        sys.exit(0)

    def _after_save(self) -> None:
        """Rank 0, after a signal-triggered save: requeue (or not) and record why."""
        from submitit.core.utils import JobPaths

        from lamamba_dist.cluster import slurm

        reason = self.stop_reason()
        restarts = restart_count()
        from lamamba_dist.train.signals import stop_reason

        self.event("stop", reason=reason, trainer=stop_reason() or (self._signals[0] if self._signals else ""),
                   seconds=round(time.time() - self._started, 1))
        delayed = self.checkpoint()
        if delayed is None:
            why = "lamamba cancel --save" if reason == "cancel --save" else \
                f"requeue limit reached ({restarts} of --max-requeues {self.max_requeues})"
            self.event("not_requeued", reason=why)
            if reason != "cancel --save":
                raise RuntimeError(f"{why}: the newest checkpoint under {self.cfg.checkpoint.dir} is complete; "
                                   "rerun the same `lamamba submit` command to continue")
            return
        # submitit's convention: the pickle of the next run is the checkpoint()'s resubmission.
        folder = os.environ.get("SUBMITIT_FOLDER")
        if folder:
            from submitit.core.utils import temporary_save_path

            paths = JobPaths(folder, job_id=self.job_id, task_id=0)
            delayed.set_timeout(self.time_min, self.max_requeues)
            with temporary_save_path(paths.submitted_pickle) as tmp:
                delayed.dump(tmp)
        # Requeue explicitly in every case: a preempted job that ends by itself within its GraceTime is
        # COMPLETED for Slurm, not requeued (PreemptMode=REQUEUE only requeues jobs it has to kill).
        slurm.requeue(self.job_id)
        self.event("requeue", by="scontrol requeue")
