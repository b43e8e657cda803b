"""The run folder's side of a resume (lamamba_dist/train/checkpointing.py ``CheckpointManager`` is one): the
folder's lock, the newest checkpoint that verifies, whether the config can continue it, and its conversion to a
DeepSpeed universal checkpoint when the world size changed (elastic resume)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from lamamba_dist.errors import TrainingError
from lamamba_dist.train import checkpoint as ckpt


class RunFolder:
    """Discovery, compatibility check and universal conversion for ``[checkpoint] dir``.

    The methods read what :class:`~lamamba_dist.train.checkpointing.CheckpointManager` sets up: ``run_dir``,
    ``cfg`` (``ccfg``/``tcfg`` its checkpoint and train sections, ``cfg_dict`` the whole as a dict), ``rank``
    (``is_main``), ``world``, ``lock``, the ``info``/``warn`` loggers and ``_bcast`` (rank 0's value on every rank).
    Collective methods are marked so: every rank calls them in the same order."""

    def check_run_dir(self) -> Optional[str]:
        """Why ``[checkpoint] dir`` cannot hold checkpoints (checked before the first step), or None."""
        d = self.run_dir
        if d.exists() and not d.is_dir():
            return f"[checkpoint] dir = {d} is an existing file, not a folder"
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write_test-{os.getpid()}"
            with open(probe, "wb") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            return (f"[checkpoint] dir = {d} is not writable ({e.strerror or e}): training would fail at its first "
                    "checkpoint")
        return None

    def discover(self, move_damaged_aside: bool = False) -> Optional[Path]:
        """Collective. Take the run folder's lock (rank 0) and find the newest checkpoint that verifies.

        When step folders exist but none verifies, training refuses to start (it would overwrite them) unless
        ``move_damaged_aside``: they are then moved to ``RUN/damaged/`` and training starts at step 0."""
        found_dir = None
        refuse = None
        if self.is_main:
            refuse = self.check_run_dir()
        if self.is_main and refuse is None:
            from lamamba_dist.runlock import LockedError, RunLock

            try:  # one trainer per run folder (rank 0 holds it; released by close() and on every error path)
                self.lock = RunLock(self.run_dir, "lamamba train", log=self.warn).acquire()
            except LockedError as e:
                refuse = str(e)
        if self.is_main and refuse is None:  # (check_run_dir created the folder)
            ckpt.remove_stale_tmp(self.run_dir, log=self.info)
            hashes = self.ccfg.verify == "hash"
            found = ckpt.find_latest(self.run_dir, hashes=hashes, warn=self.warn)
            found_dir = str(found) if found else None
            steps = ckpt.list_step_dirs(self.run_dir)
            if found is None and steps:
                bad = ckpt.damaged_checkpoints(self.run_dir, hashes=hashes)  # all of them: none verified
                if move_damaged_aside:
                    for p, why in bad:
                        dest = ckpt.move_aside(p, self.run_dir, why)
                        self.warn(f"moved the damaged checkpoint {p.name} aside to {dest} ({why})")
                else:
                    listing = "; ".join(f"{p.name}: {why}" for p, why in bad)
                    refuse = (f"{self.run_dir}: {len(bad)} checkpoint folder(s) and none verifies, so training will not "
                              f"start again from step 0 over them ({listing}). To start fresh anyway, rerun with "
                              f"--move-damaged-aside (they are moved to {self.run_dir / ckpt.DAMAGED_DIR}/, never "
                              "deleted), or use another [checkpoint] dir")
            elif found is not None:
                for p, why in ckpt.damaged_checkpoints(self.run_dir, hashes=False):
                    if p.name < found.name:
                        self.warn(f"older checkpoint {p.name} is damaged ({why}); retention removes it like any "
                                  "old checkpoint")
        found_dir, refuse = self._bcast((found_dir, refuse))
        if refuse:
            self.release_lock()
            raise TrainingError(refuse)
        return Path(found_dir) if found_dir else None

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def check_compatible(self, st: dict, step_dir: Path) -> None:
        """Refuse a checkpoint that the config cannot continue (model, ZeRO stage, weight precision)."""
        from lamamba_dist.train.ds_config import bf16_weights

        m = self.cfg.model
        saved = st.get("model", {})
        for key in ("name", "resolution", "num_classes", "learn_sigma"):
            if key in saved and saved[key] != getattr(m, key):
                raise TrainingError(f"{step_dir}: checkpoint was trained with [model] {key} = {saved[key]!r}, "
                                    f"the config says {getattr(m, key)!r}; use another [checkpoint] dir")
        if "arch_overrides" in saved and saved["arch_overrides"] != self.cfg_dict["model"]["arch_overrides"]:
            raise TrainingError(f"{step_dir}: checkpoint was trained with [model] arch_overrides = "
                                f"{saved['arch_overrides']!r}, the config says {m.arch_overrides!r}; use another "
                                "[checkpoint] dir")
        if st.get("zero_stage") != self.tcfg.zero_stage:
            raise TrainingError(f"{step_dir}: checkpoint was written with [train] zero_stage = {st.get('zero_stage')}, "
                                f"the config says {self.tcfg.zero_stage}; DeepSpeed cannot switch ZeRO stage on resume")
        saved_prec = st.get("precision")
        if saved_prec is not None and bf16_weights(saved_prec, self.tcfg.zero_stage) != bf16_weights(
                self.tcfg.precision, self.tcfg.zero_stage):
            raise TrainingError(f"{step_dir}: checkpoint was written with [train] precision = {saved_prec!r}, "
                                f"the config says {self.tcfg.precision!r}; DeepSpeed's bf16 state (bf16 weights, fp32 "
                                "master copy) and fp32-weight state do not load into each other")
        if st.get("global_batch") not in (None, self.tcfg.global_batch):
            self.warn(f"[train] global_batch changed from {st['global_batch']} to {self.tcfg.global_batch} on resume")

    def to_universal(self, step_dir: Path, saved_world: int) -> Path:
        """Collective. Convert ``step_dir``'s DeepSpeed state to a universal checkpoint (rank 0), return its dir."""
        out_root = self.run_dir / ".universal" / step_dir.name
        out = out_root / f"{ckpt.DS_TAG}_universal"
        err = None
        if self.is_main:
            done = out_root / "DONE"
            if not done.is_file():
                shutil.rmtree(out_root, ignore_errors=True)
                out_root.mkdir(parents=True, exist_ok=True)
                self.info(f"elastic resume: {saved_world} -> {self.world} ranks, converting {step_dir.name} "
                          "to a DeepSpeed universal checkpoint")
                workers = str(universal_workers())
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                       "--input_folder", str(step_dir / ckpt.DS_DIR / ckpt.DS_TAG), "--output_folder", str(out),
                       "--num_extract_workers", workers, "--num_merge_workers", workers]
                if self.tcfg.zero_stage in (0, 1, 2):
                    cmd.append("--inject_missing_state")
                t0 = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    tail = (res.stdout + res.stderr)[-3000:]
                    err = f"universal checkpoint conversion failed (rc {res.returncode}):\n{tail}"
                else:
                    ckpt.atomic_write_text(done, "ok\n")
                    self.info(f"universal checkpoint written in {time.perf_counter() - t0:.1f}s")
        err = self._bcast(err)
        if err:
            raise TrainingError(err)
        return out_root


def universal_workers() -> int:
    """Processes for ``ds_to_universal`` (``LAMAMBA_UNIVERSAL_WORKERS``; default: 1 per 4 cores, at most 8)."""
    env = os.environ.get("LAMAMBA_UNIVERSAL_WORKERS")
    if env:
        return max(1, int(env))
    return max(1, min(8, (os.cpu_count() or 1) // 4))
