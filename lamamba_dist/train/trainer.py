"""The training loop: DeepSpeed engine, diffusion loss, EMA, checkpoints, resume, signals, logging.

One ``Trainer`` per process (rank). ``run_training(cfg)`` is the whole job:

1. join the process group from the environment (torchrun / deepspeed launcher / submitit set RANK,
   WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; a plain ``python`` call becomes a 1-rank group);
2. find the newest complete checkpoint under ``[checkpoint] dir`` (rank 0 verifies sizes and hashes,
   falls back past damaged ones with a warning, broadcasts the choice);
3. if it was written on another world size, convert it to a DeepSpeed universal checkpoint and load it
   with ``load_universal`` for that one load (elastic resume);
4. train: each sample's timestep, noise and class-dropout draw are made by the loader's worker
   processes from a CPU generator seeded by the sample's draw position (seed, stream, position: used
   once in a run), so they depend neither on history nor on the world size or the device: a resize
   changes the losses only by reduction order. (Class dropout is therefore applied here, and the
   model's own ``LabelEmbedder`` dropout is switched off; its null row stays.) The global torch RNG is
   also reseeded per (seed, step, rank, micro-batch) for anything else that draws from it;
5. at every step boundary one fused check (nonfinite.py) all-reduces (loss sum, grad norm, stop flag) and
   reads it once: a non-finite loss or gradient on any rank makes every rank skip the optimizer step
   (batch keys logged); ``max_nonfinite_in_row`` skipped steps in a row roll back to the last
   checkpoint; a stop request saves and returns ``EXIT_REQUEUE``.

Precision (``[train] precision``, ds_config.py): in "bf16" (ZeRO >= 1) the engine holds bf16 weights; the model
input is cast to them at the model boundary and the output back to fp32, so the diffusion math stays fp32. No
``torch.autocast`` is entered here ("bf16_autocast", and "bf16" at ZeRO-0, have DeepSpeed's engine enter it).

Data position is the loader state (images seen); it is not rewound on rollback (the offending batches
are not replayed: the RNG salt changes too).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from lamamba_dist.train import checkpoint as ckpt
from lamamba_dist.distributed import broadcast_object, ensure_dist_env, init_device_and_process_group
from lamamba_dist.errors import SaveError, TrainingError
from lamamba_dist.train.checkpointing import CheckpointManager, jsonable
from lamamba_dist.train.engine import build_engine, build_model, flops_per_image, vae_meta
from lamamba_dist.train.faults import fault, fault_hit
from lamamba_dist.train.rng import micro_seed, rng_state, seed_rng
from lamamba_dist.train.step import diffusion_loss, model_boundary
from lamamba_dist.train.signals import EXIT_FAILURE, EXIT_OK, EXIT_REQUEUE, StopSignals, stop_reason, stop_requested

log = logging.getLogger("lamamba.train")
__all__ = ["Trainer", "TrainingError", "SaveError", "build_model", "run_training"]


# fault injection for tests: LAMAMBA_FAULT (the points: faults.fault_hit); tests/helpers/slurm_entry.py wraps _fault
_fault_hit = fault_hit
_fault = fault


# --------------------------------------------------------------------------- trainer


ROLLED_BACK = "rolled back"  # Trainer._after_step: the loop goes on from the rolled-back state


class Trainer:
    def __init__(self, cfg, *, resume: bool = True, init_on_device: bool = False, move_damaged_aside: bool = False):
        """Join the process group, find the checkpoint to resume from, build model, engine, EMA and loader.

        ``resume=False`` (benchmarks): no checkpoint is looked for and nothing is written under
        ``[checkpoint] dir``. ``init_on_device=True``: build the model on this rank's GPU (:func:`build_model`).
        When step folders exist but none verifies, training refuses to start (it would overwrite them) unless
        ``move_damaged_aside``: they are then moved to ``RUN/damaged/`` and training starts at step 0.
        """
        self._join(cfg)  # the process group and this rank's device (lamamba_dist/distributed.py)
        universal_dir, saved_world = self._find_resume_point(resume, move_damaged_aside)  # checkpointing.py
        self._build_engine(init_on_device, universal_dir)  # model, engine, objective, EMA (engine.py)
        loader_state = self._restore(universal_dir, saved_world)  # the training state: fresh, or resumed
        self.loader = self.build_loader(self.tcfg.micro_batch, loader_state)
        self.flops_per_image = flops_per_image(cfg, self.info)
        self.vae_meta = vae_meta(cfg)
        self._build_watch()  # samples and FID during training (watch.py)

    def _join(self, cfg) -> None:
        import torch.distributed as dist

        from lamamba_dist.config import to_dict

        self.cfg = cfg
        self.tcfg, self.ocfg, self.ccfg = cfg.train, cfg.optim, cfg.checkpoint
        ensure_dist_env()
        if self.tcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.on_cuda, self.device = init_device_and_process_group()
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.run_dir = Path(self.ccfg.dir)
        self.cfg_dict = to_dict(cfg)

    def _find_resume_point(self, resume: bool, move_damaged_aside: bool) -> tuple[Optional[Path], int]:
        """The checkpoint to resume from (``self.resume_dir``, ``self.state``); returns the universal checkpoint
        to load from when the world size changed under a partitioned optimizer state, and the saved world size."""
        self.ckpt = CheckpointManager(self.cfg, dist=self.dist, rank=self.rank, world=self.world, device=self.device,
                                      info=self.info, warn=self.warn, bcast=broadcast_object)
        self.resume_dir: Optional[Path] = self.ckpt.discover(move_damaged_aside) if resume else None
        self.state: dict[str, Any] = ckpt.read_trainer_state(self.resume_dir) if self.resume_dir else {}
        if self.state:
            self.ckpt.check_compatible(self.state, self.resume_dir)
        saved_world = int(self.state.get("world_size", self.world)) if self.state else self.world
        # Optimizer state split across ranks (ZeRO, DeepSpeed's bf16 optimizer) shows as *_optim_states.pt
        # files; without them (stage 0) the state is whole and loads on any world size as it is.
        partitioned = bool(self.state) and any((self.resume_dir / ckpt.DS_DIR / ckpt.DS_TAG).glob("*_optim_states.pt"))
        self.elastic = bool(self.state) and saved_world != self.world and partitioned
        universal_dir = None
        if self.elastic:
            universal_dir = self.ckpt.to_universal(self.resume_dir, saved_world)
        return universal_dir, saved_world

    def _build_engine(self, init_on_device: bool, universal_dir: Optional[Path]) -> None:
        parts = build_engine(self.cfg, rank=self.rank, world=self.world, on_cuda=self.on_cuda, device=self.device,
                             init_on_device=init_on_device, load_universal=universal_dir is not None, info=self.info)
        self.engine, self.ds_config, self.accum = parts.engine, parts.ds_config, parts.accum
        self.model_dtype, self.diffusion, self.latent_size = parts.model_dtype, parts.diffusion, parts.latent_size
        self.class_dropout, self.null_class = parts.class_dropout, parts.null_class
        self.grads, self.guard, self.ema = parts.grads, parts.guard, parts.ema
        # the engine at the model boundary: input in the weights' dtype, output in fp32 (step.py)
        self._model = model_boundary(self.grads.forward if self.grads is not None else self.engine, self.model_dtype,
                                     cudagraphs=parts.cudagraphs)
        self.ckpt.attach(self.engine, self.ema)

    def _restore(self, universal_dir: Optional[Path], saved_world: int) -> Optional[dict]:
        """The counters of a fresh run, then the resumed state when there is one; returns the loader's state."""
        self.step = 0
        self._pending: Optional[tuple] = None  # a step queued but not yet settled (queue_step)
        self.images_seen = 0
        self.rollbacks = 0
        self.skipped_total = 0
        self.nonfinite_in_row = 0
        self.streak_start = 0  # first step of the current run of non-finite steps
        self.run_id = self.state.get("wandb_run_id") if self.state else None
        loader_state = None
        if self.state:
            t0 = time.perf_counter()
            loader_state = self._load(self.resume_dir, universal_dir)
            self.info(f"resumed from {self.resume_dir} (step {self.step}, {self.images_seen} images seen"
                      + (f", elastic {saved_world} -> {self.world} ranks" if saved_world != self.world else "")
                      + f") in {time.perf_counter() - t0:.1f}s")
        if self.run_id is None:
            from lamamba_dist.train.monitor import new_run_id

            self.run_id = broadcast_object(new_run_id() if self.is_main else None)
        return loader_state

    def _build_watch(self) -> None:
        from lamamba_dist.train.watch import RunWatcher

        self.watch = RunWatcher(self.cfg, engine=self.engine, ema=self.ema, dist=self.dist, rank=self.rank,
                                world=self.world, device=self.device, run_dir=self.run_dir, vae_meta=self.vae_meta,
                                precision=self.tcfg.precision, info=self.info, warn=self.warn)

    def build_loader(self, micro_batch: int, state: Optional[dict] = None):
        """This rank's data loader: batches of ``micro_batch`` with their per-sample diffusion draws, pinned on GPUs."""
        from lamamba_dist.data import build_latent_loader

        return build_latent_loader(self.cfg.data, micro_batch=micro_batch, rank=self.rank, world_size=self.world,
                                   seed=self.tcfg.seed, latent_size=self.latent_size, state=state,
                                   num_timesteps=self.diffusion.num_timesteps, pin_memory=self.on_cuda,
                                   num_classes=self.cfg.model.num_classes)

    # ------------------------------------------------------------------ small helpers
    def info(self, msg: str) -> None:
        if self.is_main:
            self._print(msg)

    def warn(self, msg: str) -> None:
        self._print(f"WARNING: {msg}")

    def _print(self, msg: str) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(f"[lamamba train r{getattr(self, 'rank', 0)}] {msg}", file=sys.stderr)
        except Exception:  # pragma: no cover
            print(msg, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ checkpoints (checkpointing.py)
    def _load(self, step_dir: Path, universal_dir: Optional[Path]) -> Optional[dict]:
        st, loader_state = self.ckpt.load(step_dir, universal_dir)
        self.step = int(st["step"])
        self.images_seen = int(st["images_seen"])
        self.rollbacks = int(st.get("rollbacks", 0))
        self.skipped_total = int(st.get("skipped_steps", 0))
        return loader_state

    def _meta(self, ema: bool) -> dict:
        m = self.cfg.model
        return {"model": m.name, "resolution": m.resolution, "num_classes": m.num_classes, "learn_sigma": m.learn_sigma,
                "arch_overrides": self.cfg_dict["model"]["arch_overrides"],
                "class_dropout": m.class_dropout, "step": self.step, "images_seen": self.images_seen, "ema": ema,
                "ema_decay": self.ocfg.ema_decay, "run_id": self.run_id, **self.vae_meta}

    def save(self, background: bool = False) -> None:
        """Collective: save this step (:meth:`CheckpointManager.save`). ``background``: return once the state is
        copied to host memory (periodic saves); otherwise the checkpoint is complete when this returns."""
        loader_state = jsonable(self.loader.state_dict())
        state = {
            "format": ckpt.FORMAT_VERSION, "step": self.step, "images_seen": self.images_seen,
            "world_size": self.world, "zero_stage": self.tcfg.zero_stage, "precision": self.tcfg.precision,
            "global_batch": self.tcfg.global_batch, "micro_batch": self.tcfg.micro_batch,
            "model": {"name": self.cfg.model.name, "resolution": self.cfg.model.resolution,
                      "num_classes": self.cfg.model.num_classes, "learn_sigma": self.cfg.model.learn_sigma,
                      "arch_overrides": self.cfg_dict["model"]["arch_overrides"]},
            "wandb_run_id": self.run_id, "loader_state": loader_state, "rollbacks": self.rollbacks,
            "skipped_steps": self.skipped_total, "config": self.cfg_dict, "config_source": self.cfg.source,
            "ds_global_steps": int(self.engine.global_steps), "time": time.time(),
        } if self.is_main else {}
        meta = self._meta(ema=True)
        self.ckpt.save(self.step, trainer_state=state, rank_state={"rng": rng_state(), "loader_state": loader_state},
                       meta=lambda ema: dict(meta, ema=ema), background=background and self.ccfg.background)

    # ------------------------------------------------------------------ non-finite handling
    def _rollback(self) -> None:
        # The newest checkpoint written before the non-finite streak began (one written during it may
        # hold weights damaged by a step that DeepSpeed could not skip).
        self.ckpt.complete()  # a save still being written is published (or fails) first
        target = self.ckpt.rollback_target(self.streak_start)
        if target is None:
            raise TrainingError(f"{self.nonfinite_in_row} non-finite steps in a row and no checkpoint from before "
                                f"step {self.streak_start} to roll back to")
        self.warn(f"{self.nonfinite_in_row} non-finite steps in a row: rolling back to {target.name} "
                  "(data position kept: the offending batches are not replayed)")
        rollbacks = self.rollbacks + 1
        skipped = self.skipped_total
        images_now, loader = self.images_seen, self.loader
        uni = None
        st = ckpt.read_trainer_state(target)
        if int(st.get("world_size", self.world)) != self.world:
            uni = self.ckpt.to_universal(target, int(st["world_size"]))
        self._load(target, uni)
        self.loader = loader  # keep going forward in the data
        self.rollbacks, self.skipped_total, self.nonfinite_in_row = rollbacks, skipped, 0
        self._images_discarded = getattr(self, "_images_discarded", 0) + images_now - self.images_seen

    # ------------------------------------------------------------------ one step
    def train_step(self, it, meter=None) -> dict:
        """One optimizer step, settled (``lamamba bench-train``'s profiles, tests; the loop runs :meth:`queue_step`).
        ``self.step`` is left to the caller."""
        assert self._pending is None, "a deferred step is pending: settle() it first"
        return self.queue_step(it, meter)[-1]

    def queue_step(self, it, meter=None, defer: bool = False) -> list[dict]:
        """One optimizer step of the training loop (``lamamba train`` and ``lamamba bench-train`` both run this).

        ``accum`` micro-batches from the loader iterator ``it`` (each with its per-sample draws, made by the
        loader): forward with the fp32 diffusion loss, backward; after the last backward the fused check
        (nonfinite.py: the step's one collective of ours); ``engine.step()`` on every micro-batch (DeepSpeed counts
        them), where torch's fused AdamW skips a non-finite update on the device. Settling the step
        (:meth:`_settle`: reading the check's verdict, the EMA update when the step was applied, DeepSpeed's
        bookkeeping of a skipped one) waits for the device to reach the check. With ``defer`` it waits until the
        next step's backward has been queued (it must come before that step's optimizer update, which the EMA
        must not see): the host then never waits for the device, and queues the next forward while the device
        still runs this step's backward and update, as a plain PyTorch loop does. A step after one that was not
        applied, or that asked to stop, is settled at once (the loop acts on those at the step boundary).

        Returns the results of the steps settled by this call, oldest first (a deferred previous one, then this
        one unless deferred): ``{"applied": bool, "loss_sum": float (sum of the micro-batch mean losses over
        micro-batches and ranks), "grad_norm": float or None, "stop": bool, "bad_keys": [sample keys of this
        rank's non-finite micro-batches], ...}``. ``self.step`` is left to the caller.
        """
        t = self.tcfg
        dev = self.device
        step = self.step + (self._pending is not None)  # steps done before this one
        loss_sum = None
        micro_losses: list[torch.Tensor] = []
        micro_keys: list[list] = []
        done: list[dict] = []
        for micro in range(self.accum):
            tw = time.perf_counter()
            batch = next(it)
            if meter is not None:
                meter.data_wait += time.perf_counter() - tw
            seed_rng(micro_seed(t.seed, step, self.rank, micro, self.rollbacks), dev)
            b = batch.to(dev, non_blocking=True)  # one transfer (lamamba_dist/data/batch.py Batch)
            x0, y, tt, noise = b["latent"], b["label"], b["t"], b["noise"]
            if _fault_hit("nan", step):
                x0 = torch.full_like(x0, float("nan"))
            if self.class_dropout > 0:
                y = torch.where(b["u"] < self.class_dropout, self.null_class, y)
            loss = diffusion_loss(self.diffusion, self._model, x0, tt, y, noise)
            detached = loss.detach()
            loss_sum = detached if loss_sum is None else loss_sum + detached
            micro_losses.append(detached)
            micro_keys.append(batch.get("key", []))
            last = micro == self.accum - 1
            if self.grads is not None:
                self.grads.backward(loss, boundary=last)
            else:
                self.engine.backward(loss)
            if last:
                if self._pending is not None:  # the previous step, before this one's update
                    done.append(self._settle())
                    defer = defer and done[0]["applied"] and not done[0]["stop"]
                # the checkpoint writers' states ride along in the check's all-reduce (checkpointing.py)
                self.guard.check(loss_sum, stop_requested(), self.ckpt.flags())
            self.ema.join()  # an EMA update on its own stream reads the master weights this step may change
            self.engine.step()
        updated = None
        if self.ema.overlapped:  # the EMA of this step waits on the device for this point (ema.py)
            updated = torch.cuda.Event()
            updated.record()
        self._pending = (micro_losses, micro_keys, self.engine.was_step_applied(), updated)
        if not defer:
            done.append(self._settle())
        return done

    def settle(self) -> list[dict]:
        """The result of a deferred step ([] when none is pending); see :meth:`queue_step`."""
        return [self._settle()] if self._pending is not None else []

    def _settle(self) -> dict:
        micro_losses, micro_keys, engine_applied, updated = self._pending
        self._pending = None
        verdict = self.guard.finish()
        applied = engine_applied and not verdict.nonfinite
        if applied:
            self.ema.update(after=updated)
        bad_keys: list[str] = []
        if verdict.nonfinite:  # the rare path: which micro-batches of this rank were non-finite
            for value, keys in zip(torch.stack(micro_losses).tolist(), micro_keys):
                if not math.isfinite(value):
                    bad_keys.extend(str(k) for k in keys)
        return {"applied": applied, "loss_sum": verdict.loss_sum, "grad_norm": verdict.grad_norm,
                "stop": verdict.stop, "bad_keys": bad_keys, "ckpt_counts": verdict.counts,
                "nonfinite": None if applied else verdict.reason()}

    def _may_defer(self, step: int, steps_this_run: int) -> bool:
        """Whether the loop may settle step ``step`` (counted from 1) late: nothing is due at it that needs the
        settled state (log line, checkpoint, sample grid or FID, ``exit_after``, the last step), and the step
        before it was applied (a streak of non-finite steps is acted on step by step)."""
        t = self.tcfg
        return not (step % t.log_every == 0 or step >= t.steps or step % self.ccfg.every == 0
                    or any(self.watch.due(step)) or (t.exit_after and steps_this_run >= t.exit_after)
                    or t.max_nonfinite_in_row <= 1 or self.nonfinite_in_row > 0)

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        from lamamba_dist.train.monitor import LoopMetrics

        t = self.tcfg
        lp = LoopMetrics.open(run_dir=self.run_dir, is_main=self.is_main, log_cfg=self.cfg.logging, run_id=self.run_id,
                              config=self.cfg_dict, steps=t.steps, initial=self.step, precision=t.precision,
                              log=self.info)
        stats = lp.stats
        if stats:
            self.ckpt.on_saved = stats.write  # one "checkpoint" event per published save
        it = iter(self.loader)
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats()
        if stats and self.resume_dir is not None:
            # Steps after a resume repeat the ones the interrupted run logged after this checkpoint: mark the seam.
            stats.write({"event": "resume", "step": self.step, "from": self.resume_dir.name,
                         "images_seen": self.images_seen, "world_size": self.world, "host": socket.gethostname(),
                         "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "time": time.time()})
        if self.is_main:
            self.info(f"{self.cfg.model.name} @ {self.cfg.model.resolution}px, ZeRO-{t.zero_stage}, {t.precision}, "
                      f"{self.world} rank(s), global batch {t.global_batch} = {t.micro_batch} x {self.accum} accum x "
                      f"{self.world}, run dir {self.run_dir}")
        self.engine.train()
        code = EXIT_OK
        try:
            while self.step + (self._pending is not None) < t.steps:
                queued = self.step + (self._pending is not None)  # steps done or queued before this one
                _fault("step", queued)
                defer = self._may_defer(queued + 1, lp.steps_this_run + (self._pending is not None) + 1)
                results = self.queue_step(it, lp.meter, defer=defer)
                stop = any(r["stop"] for r in results)  # acted on at the newest settled step
                outcome = None
                for i, res in enumerate(results):
                    outcome = self._after_step(res, stop and i == len(results) - 1, lp)
                    if outcome is not None:
                        break
                if outcome is not None and outcome != ROLLED_BACK:
                    code = outcome
                    break
            else:
                if self.ckpt.last_saved_step != self.step:
                    self.save()
            self.ckpt.complete()  # nothing of this run is left unpublished (a no-op after a synchronous save)
        finally:
            lp.close()
        return code

    def _after_step(self, res: dict, stop: bool, lp):
        """The loop's work after a settled step: counters, the non-finite streak (rollback), the log line, samples,
        checkpoints, a stop or ``exit_after``. Returns None to go on, :data:`ROLLED_BACK`, or the exit code."""
        t = self.tcfg
        self.ckpt.on_step(res["ckpt_counts"])  # publishes a save every rank has written; raises if one failed
        applied, bad_keys = res["applied"], res["bad_keys"]
        self.step += 1
        lp.steps_this_run += 1
        self.images_seen += t.global_batch
        lp.meter.images += t.global_batch
        lp.meter.steps += 1
        lp.bar.update(1)
        if applied:
            self.nonfinite_in_row = 0
            lp.add_loss(res["loss_sum"] / (self.accum * self.world))
        else:
            self.skipped_total += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row == 1:
                self.streak_start = self.step
            gathered: list = [None] * self.world
            if self.world > 1:
                self.dist.all_gather_object(gathered, bad_keys)
            else:
                gathered = [bad_keys]
            keys = [k for g in gathered for k in g]
            self.warn(f"step {self.step}: non-finite {res['nonfinite']}, optimizer step skipped "
                      f"({self.nonfinite_in_row} in a row); batch keys: {keys[:32]}"
                      + (" ..." if len(keys) > 32 else "")) if self.is_main else None
            if lp.stats:
                lp.stats.write({"event": "nonfinite", "what": res["nonfinite"], "step": self.step,
                                "images_seen": self.images_seen,
                                "keys": keys, "in_row": self.nonfinite_in_row, "time": time.time()})
            if self.nonfinite_in_row >= t.max_nonfinite_in_row:
                if self.rollbacks >= t.max_rollbacks:
                    self.warn(f"giving up after {self.rollbacks} rollbacks")
                    return EXIT_FAILURE
                try:
                    self._rollback()
                except TrainingError as e:
                    self.warn(str(e))
                    return EXIT_FAILURE
                lp.bar.n = self.step
                return ROLLED_BACK

        if self.step % t.log_every == 0 or self.step == t.steps:
            snap = lp.meter.snapshot()
            gnorm = res["grad_norm"] if res["grad_norm"] is not None else self.guard.grad_norm()
            saves, self.ckpt.pending_records = self.ckpt.pending_records, []  # published since the last line
            lp.log(self.step, self.images_seen, snap, gnorm, float(self.engine.get_lr()[0]), skipped=self.skipped_total,
                   world=self.world, flops_per_image=self.flops_per_image, saves=saves, on_cuda=self.on_cuda,
                   is_main=self.is_main)

        if not stop and self.watch.enabled:  # skipped when stopping: the save comes first
            lp.meter.t0 += self.watch.run_due(self.step, self.images_seen, lp.stats, lp.wb)  # kept out of img/s
        if stop:
            self.info(f"stop requested ({stop_reason() or 'another rank'}): saving at step {self.step}")
            self.save()
            return EXIT_REQUEUE
        if self.step % self.ccfg.every == 0 or self.step == t.steps:
            self.save(background=self.step < t.steps)  # the last one completes before the run ends
        if t.exit_after and lp.steps_this_run >= t.exit_after and self.step < t.steps:
            if self.ckpt.last_saved_step != self.step:
                self.save()
            self.ckpt.complete()
            self.info(f"[train] exit_after = {t.exit_after} steps reached: exiting for requeue")
            return EXIT_REQUEUE
        return None

    def close(self) -> None:
        try:
            self.engine.destroy()
        except Exception:  # pragma: no cover
            pass
        if getattr(self, "ckpt", None) is not None:
            self.ckpt.close()  # the writer thread, the run folder's lock
        try:
            self.dist.barrier()
        except Exception:  # pragma: no cover
            pass


def run_training(cfg, move_damaged_aside: bool = False) -> int:
    """See :func:`lamamba_dist.train.run_training`."""
    import torch.distributed as dist

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from lamamba_dist.runlock import release_all

    with StopSignals():
        try:
            trainer = Trainer(cfg, move_damaged_aside=move_damaged_aside)
        except BaseException:
            release_all()  # the run folder's lock, when the error came after it was taken
            raise
        try:
            return trainer.run()
        finally:
            trainer.close()
            if dist.is_initialized():
                dist.destroy_process_group()
