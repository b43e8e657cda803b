"""The trainer's checkpoints: :class:`CheckpointManager` finds, checks, loads, saves and prunes them.

The on-disk format is :mod:`lamamba_dist.train.checkpoint` (a folder counts only when ``COMPLETE.json`` lists
the size and sha256 of every file in it; the newest folder that verifies is the one resumed from). This module
is the trainer's side of it: which folder to resume from, whether it fits the config, the conversion to a
DeepSpeed universal checkpoint on another world size (those three in resume.py, :class:`RunFolder`), the load,
the save, retention.

**Saves in the background.** A periodic save stops training only while this rank's state is copied to host
memory (pinned on GPUs; the copies are queued on the training stream, so the next step cannot change a tensor
before it is copied): the DeepSpeed engine state (DeepSpeed's own ``save_checkpoint``, with a checkpoint engine
that snapshots each state dict instead of writing it, :class:`~lamamba_dist.train.snapshot.SnapshotEngine`), the EMA (and, with ``[checkpoint]
inference_weights``, the raw fp32 weights), RNG and data-loader state. A writer thread per rank then writes the
files into the save's temporary folder, fsyncs them and records their sizes and sha256 in
``.digests/rank_XXXXX.json``. Each rank's writer status (written, failed) travels in the one small all-reduce
that every step already makes (lamamba_dist/train/nonfinite.py): at the first step boundary where every rank
has written, rank 0 merges the digests, writes ``COMPLETE.json`` and renames the folder into place; the step
never waits for it. A failed write (disk full, permission) reaches every rank the same way: the temporary folder
is removed and :class:`SaveError` ends the run (exit 1), the earlier checkpoints untouched.

At most one save is in flight (host memory holds one copy of the state, its buffers reused by the next save): a
save that finds the previous one still writing waits for it, and the wait is reported. Saves at stop time
(signals, ``exit_after``, the end of training) are synchronous: they complete before the trainer returns.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lamamba_dist.errors import SaveError, TrainingError
from lamamba_dist.hashing import sha256_file
from lamamba_dist.train import checkpoint as ckpt
from lamamba_dist.train.faults import enospc, fault, fault_hit
from lamamba_dist.train.resume import RunFolder
from lamamba_dist.train.snapshot import (HostBuffers, SnapshotEngine, fsync_file, lower_thread_priority,
                                         save_hashed)

DIGESTS_DIR = ".digests"
# The background writer's CPU priority (nice, Linux: per thread): where the host is busy, the training thread
# that queues the GPU's work goes first; the write only needs to end before the next save is due.
WRITER_NICE = 10


class _Save:
    """One save: what was snapshotted, where it goes, and how far it got."""

    def __init__(self, step: int, tmp: Path, background: bool):
        self.step, self.tmp, self.background = step, tmp, background
        self.jobs: list[tuple[str, Callable[[], None], Path]] = []  # (what, write function, file)
        self.event: Optional[torch.cuda.Event] = None
        self.status = "snapshot"  # -> "writing" -> "written" | "failed"
        self.error: Optional[str] = None
        self.blocked_s = 0.0
        self.wait_s = 0.0
        self.write_s: Optional[float] = None
        self.write_started = self.write_ended = None  # wall clock of this rank's writer
        self.nbytes = 0
        self.done = threading.Event()


class CheckpointManager(RunFolder):
    """Discovery, compatibility check, universal conversion (:class:`~lamamba_dist.train.resume.RunFolder`), load,
    save (in the background), retention.

    Built before the engine (:meth:`discover` decides what to resume from); :meth:`attach` gives it the engine
    and the EMA. Collective methods are marked so: every rank calls them in the same order.
    """

    def __init__(self, cfg, *, dist, rank: int, world: int, device: torch.device,
                 info: Callable[[str], None], warn: Callable[[str], None], bcast: Callable[[Any], Any]):
        from lamamba_dist.config import to_dict

        self.cfg, self.ccfg, self.tcfg = cfg, cfg.checkpoint, cfg.train
        self.cfg_dict = to_dict(cfg)
        self.dist, self.rank, self.world, self.device = dist, rank, world, device
        self.is_main = rank == 0
        self.info, self.warn, self._bcast = info, warn, bcast
        self.run_dir = Path(self.ccfg.dir)
        self.lock = None
        self.engine = None
        self.ema = None
        self.saved: list[tuple[int, Path]] = []  # complete checkpoints of this run, oldest first
        self.last_saved_step: Optional[int] = None  # the newest step saved or being saved
        self.last_dir: Optional[Path] = None
        self.in_flight: Optional[_Save] = None
        self.on_saved: Callable[[dict], None] = lambda rec: None  # rank 0: one record per published save
        self.pending_records: list[dict] = []
        self._publish_error: Optional[str] = None
        self._failed_save: Optional[_Save] = None
        self._buffers = HostBuffers(pinned=device.type == "cuda")
        self._queue: "queue.Queue[Optional[_Save]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ load
    def attach(self, engine, ema) -> None:
        """The engine and EMA whose state is saved and loaded; installs the snapshotting checkpoint engine."""
        self.engine, self.ema = engine, ema
        engine.checkpoint_engine = SnapshotEngine(engine.checkpoint_engine, self._buffers)
        if self.device.type == "cuda":
            self._buffers.reserve(self._snapshot_estimate())

    def wait_host_buffers(self, timeout: Optional[float] = None) -> float:
        """Wait for the pinned host memory of background saves that :meth:`attach` allocates in the background;
        returns the seconds waited (``lamamba bench-train`` times steady training, after it)."""
        return self._buffers.wait_reserved(timeout)

    def _snapshot_estimate(self) -> int:
        """Bytes of this rank's snapshot, estimated from the parameter count (a few percent over): the module's
        weights (rank 0 under ZeRO-0/1/2, a partition under ZeRO-3), the fp32 master weights and Adam's two
        moments (partitioned under ZeRO-1/2/3), and on rank 0 the full fp32 EMA (and raw weights)."""
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        weight = 2 if self.engine.bfloat16_enabled() else 4
        zero = self.tcfg.zero_stage
        if zero == 0:  # rank 0 writes everything (weights, Adam state)
            total = (12 + weight) * n if self.is_main else 0
        else:
            total = 12 * n / self.world + (weight * n / self.world if zero == 3 else weight * n if self.is_main else 0)
        if self.is_main:
            total += 4 * n * (2 if self.ccfg.inference_weights else 1)
        return int(total * 1.03) + (64 << 20)

    def load(self, step_dir: Path, universal_dir: Optional[Path]) -> tuple[dict, Optional[dict]]:
        """Collective. Load ``step_dir`` into the engine and EMA (and this rank's RNG): ``(trainer state, loader
        state)``; the loader state is this rank's own when the world size is unchanged."""
        from lamamba_dist.weights import load_weights

        st = ckpt.read_trainer_state(step_dir)
        self.ema.join()  # an EMA update still reading the master weights comes before the load replaces them
        if universal_dir:
            load_dir, tag = universal_dir, f"{ckpt.DS_TAG}_universal"
            self.engine._config.load_universal_checkpoint = True
        else:
            load_dir, tag = step_dir / ckpt.DS_DIR, ckpt.DS_TAG
        path, _ = self.engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise TrainingError(f"{step_dir}: DeepSpeed found no checkpoint in {load_dir}/{tag}")
        # load_universal applies to this one load only: later checkpoints are ordinary ones.
        self.engine._config.load_universal_checkpoint = False
        ema_sd, _ = load_weights(step_dir / ckpt.EMA_FILE)
        self.ema.load_full_state_dict(ema_sd, source=str(step_dir / ckpt.EMA_FILE))
        step = int(st["step"])
        self.last_saved_step, self.last_dir = step, step_dir
        if not any(p == step_dir for _, p in self.saved):
            self.saved.append((step, step_dir))
        loader_state = st.get("loader_state")
        if int(st.get("world_size", -1)) == self.world:
            from lamamba_dist.train.rng import set_rng_state

            rs = torch.load(ckpt.rank_state_path(step_dir, self.rank), map_location="cpu", weights_only=False)
            set_rng_state(rs["rng"])
            loader_state = rs.get("loader_state", loader_state)
        return st, loader_state

    def rollback_target(self, before_step: int) -> Optional[Path]:
        """Collective. The newest complete checkpoint of a step before ``before_step`` (rank 0 decides)."""
        target = None
        if self.is_main:
            ok = [p for s, p in self.saved if s < before_step and ckpt.verify_checkpoint(p, hashes=False) is None]
            target = str(ok[-1]) if ok else None
        target = self._bcast(target)
        return Path(target) if target else None

    # ------------------------------------------------------------------ save
    def _inference_extras(self) -> dict[str, torch.Tensor]:
        """Frozen parameters and persistent buffers (full tensors), which the EMA does not cover."""
        module = self.engine.module
        frozen = [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        out: dict[str, torch.Tensor] = {}
        if frozen:
            if hasattr(frozen[0][1], "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=None):
                    out.update({n: p.detach().float().cpu().clone() for n, p in frozen})
            else:
                out.update({n: p.detach().float().cpu().clone() for n, p in frozen})
        params = {n for n, _ in module.named_parameters()}
        for k, v in module.state_dict().items():
            if k not in params:
                out[k] = v.detach().cpu().clone()
        return out

    def save(self, step: int, *, trainer_state: dict, rank_state: dict, meta: Callable[[bool], dict],
             background: Optional[bool] = None) -> None:
        """Collective. Save step ``step``: every rank snapshots its state, then writes it (in the background
        unless ``background`` is False or ``[checkpoint] background`` is off, or synchronously: complete and
        published when this returns). ``trainer_state`` (rank 0) becomes trainer_state.json, ``rank_state``
        (RNG, loader) this rank's rank_state file, ``meta(ema)`` the safetensors metadata."""
        from lamamba_dist.weights import save_weights

        if background is None:
            background = self.ccfg.background
        t_wait = time.perf_counter()
        self.complete()  # at most one save in flight
        wait_s = time.perf_counter() - t_wait
        t0 = time.perf_counter()
        nonce = self._bcast(os.urandom(4).hex() if self.is_main else None)
        tmp = ckpt.new_tmp_dir(self.run_dir, step, nonce)
        err = None
        if self.is_main:
            try:
                tmp.mkdir(parents=True, exist_ok=False)
            except OSError as e:
                err = f"{e.filename or tmp}: {e.strerror or e}"
        err = self._bcast(err)
        if err is not None:
            raise self._save_error(step, err)
        self.dist.barrier()
        sv = _Save(step, tmp, background)
        sv.wait_s = wait_s
        self._buffers.start()
        snap = self.engine.checkpoint_engine
        snap.captured = []
        try:
            self.engine.save_checkpoint(str(tmp / ckpt.DS_DIR), tag=ckpt.DS_TAG, client_state={"lamamba_step": step})
            captured = snap.captured
        except OSError as e:  # DeepSpeed's own small writes (its folders, the "latest" file)
            captured, err = [], f"{e.filename or tmp}: {e.strerror or e}"
        finally:
            snap.captured = None
        # the EMA and raw weights: assembled on rank 0 (collectives), kept where they are and copied with the rest
        ema_sd = self.ema.full_state_dict(dst=0, to_cpu=False)
        raw_sd = self.ema.full_master_weights(dst=0, to_cpu=False) if self.ccfg.inference_weights else None
        extras = self._inference_extras()
        # written as DeepSpeed's torch engine writes them (its "checkpoint_serialization" setting)
        zipfile = getattr(snap.inner, "zipfile_serialization", True)
        for path, state in captured:
            write = lambda s=state, p=path: save_hashed(s, Path(p), zipfile)  # noqa: E731
            sv.jobs.append((Path(path).name, write, Path(path)))
        rs_path = ckpt.rank_state_path(tmp, self.rank)
        rank_state = self._buffers.tree({**rank_state, "rank": self.rank, "world_size": self.world})
        sv.jobs.append(("rank state", lambda: (self.is_main or enospc(step, rs_path),  # (test hook, ranks > 0)
                                              rs_path.parent.mkdir(parents=True, exist_ok=True),
                                              save_hashed(rank_state, rs_path))[-1], rs_path))
        if self.is_main:
            ema_host = self._buffers.tree(ema_sd)
            sv.jobs.append(("EMA", lambda: self._write_weights(step, tmp / ckpt.EMA_FILE, {**extras, **ema_host},
                                                               meta(True), save_weights, fault=True),
                            tmp / ckpt.EMA_FILE))
            if raw_sd is not None:
                raw_host = self._buffers.tree(raw_sd)
                sv.jobs.append(("raw weights", lambda: self._write_weights(step, tmp / ckpt.RAW_FILE,
                                                                           {**extras, **raw_host}, meta(False),
                                                                           save_weights), tmp / ckpt.RAW_FILE))
            text = json.dumps(jsonable(trainer_state), indent=1, sort_keys=True)
            sv.jobs.append(("trainer state", lambda: (tmp / ckpt.STATE_FILE).write_text(text), tmp / ckpt.STATE_FILE))
        del ema_sd, raw_sd
        if self.device.type == "cuda":
            sv.event = torch.cuda.Event()
            sv.event.record()  # the writer waits for the host copies queued above
        sv.nbytes = self._buffers.nbytes
        if err is not None:
            sv.status, sv.error = "failed", err
            sv.done.set()
        else:
            sv.status = "writing"
            self._start_writer()
            self._queue.put(sv)
        self.in_flight = sv
        self.last_saved_step = step
        sv.blocked_s = time.perf_counter() - t0
        if not background:
            self.complete()

    @staticmethod
    def _write_weights(step: int, path: Path, tensors: dict, meta: dict, save_weights, fault: bool = False) -> None:
        if fault:
            enospc(step, path)
        save_weights(path, tensors, meta)

    # ------------------------------------------------------------------ the writer thread
    def _start_writer(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._writer, name="lamamba-checkpoint-writer", daemon=True)
            self._thread.start()

    def _writer(self) -> None:
        lower_thread_priority(WRITER_NICE)
        while True:
            sv = self._queue.get()
            if sv is None:
                return
            t0 = time.perf_counter()
            sv.write_started = time.time()
            try:
                if sv.event is not None:
                    sv.event.synchronize()
                if fault_hit("slow_write", sv.step):
                    time.sleep(2.0)
                digests: dict[str, dict] = {}
                for i, (what, write, path) in enumerate(sv.jobs):
                    digest = write()  # the sha256 of what it wrote, where it hashed while writing
                    fsync_file(path)
                    if i == 0:
                        fault("save_write", sv.step)
                    rel = str(path.relative_to(sv.tmp))
                    digests[rel] = {"size": path.stat().st_size,
                                    "sha256": digest if isinstance(digest, str) else sha256_file(path)}
                out = sv.tmp / DIGESTS_DIR / f"rank_{self.rank:05d}.json"
                out.parent.mkdir(exist_ok=True)
                ckpt.atomic_write_text(out, json.dumps(digests))
                sv.jobs = []  # the host copies may go
                sv.status = "written"
            except BaseException as e:  # noqa: BLE001 - reported to every rank at the next step boundary
                fn = getattr(e, "filename", None)
                sv.error = (f"{fn}: {e.strerror or e}" if isinstance(e, OSError) and fn
                            else f"{sv.tmp}: {type(e).__name__}: {e}")
                sv.jobs = []
                sv.status = "failed"
            sv.write_s = time.perf_counter() - t0
            sv.write_ended = time.time()
            sv.done.set()

    # ------------------------------------------------------------------ completion
    def flags(self) -> tuple[float, float]:
        """This rank's (written, failed) for the step's all-reduce (nonfinite.py's ``counts``)."""
        sv = self.in_flight
        failed = 1.0 if self._publish_error or (sv is not None and sv.status == "failed") else 0.0
        return (1.0 if sv is not None and sv.status == "written" else 0.0), failed

    def on_step(self, counts: tuple[float, ...]) -> None:
        """Collective. At the step boundary, with the all-reduced :meth:`flags` of every rank: publish the save
        that every rank has written (rank 0), or end the run on a failed one. Never waits for a writer."""
        if not counts:
            return
        written, failed = counts[0], counts[1]
        if failed > 0:
            self._fail()
        elif self.in_flight is not None and written >= self.world:
            self._publish()

    def complete(self) -> None:
        """Collective. Wait for the save in flight (if any) on every rank, then publish it or end the run."""
        sv = self.in_flight
        # every rank takes part, whatever its own state (a rank with nothing in flight reports "written")
        if sv is not None:
            sv.done.wait()
        written, failed = self.flags()
        if sv is None:
            written = 1.0
        if self.world > 1:
            t = torch.tensor([written, failed], dtype=torch.float64, device=self._collective_device())
            self.dist.all_reduce(t)
            written, failed = t.tolist()
        if failed > 0:
            self._fail()
        elif sv is not None:
            self._publish()

    def _collective_device(self) -> torch.device:
        try:
            return torch.device("cuda", torch.cuda.current_device()) if self.dist.get_backend() == "nccl" \
                else torch.device("cpu")
        except Exception:  # pragma: no cover
            return torch.device("cpu")

    def _publish(self) -> None:
        """Every rank has written the save in flight: rank 0 marks it complete and renames it into place."""
        sv, self.in_flight = self.in_flight, None
        if not self.is_main:  # (the folder's final name is known on every rank)
            final = self.run_dir / ckpt.step_dir_name(sv.step)
            self.saved = [(s, p) for s, p in self.saved if p != final] + [(sv.step, final)]
            self.last_dir = final
            return
        try:
            fault("save_before_marker", sv.step)
            digests: dict[str, dict] = {}
            ddir = sv.tmp / DIGESTS_DIR
            for f in sorted(ddir.glob("rank_*.json")):
                digests.update(json.loads(f.read_text()))
            shutil.rmtree(ddir)
            # DeepSpeed's own small files, written synchronously by rank 0 (its "latest" tag, zero_to_fp32.py)
            rest = [f for f in ckpt.list_files(sv.tmp) if f not in digests]
            digests.update(ckpt.digest_files(sv.tmp, rest))
            ckpt.write_marker(sv.tmp, digests, sv.step)
            final = ckpt.publish(sv.tmp, self.run_dir, sv.step)
        except OSError as e:
            self._publish_error = f"{getattr(e, 'filename', None) or sv.tmp}: {e.strerror or e}"
            self._failed_save = sv
            return
        fault("save_after_marker", sv.step)
        ckpt.prune(self.run_dir, self.ccfg.keep, log=self.info)
        self.saved = [(s, p) for s, p in self.saved if p != final and p.exists()] + [(sv.step, final)]
        self.last_dir = final
        rec = {"event": "checkpoint", "step": sv.step, "dir": final.name, "background": sv.background,
               "blocked_s": round(sv.blocked_s, 3), "wait_s": round(sv.wait_s, 3),
               "write_s": round(sv.write_s or 0.0, 3), "gib": round(sv.nbytes / 2**30, 3),  # this rank's snapshot
               "files_gib": round(sum(d["size"] for d in digests.values()) / 2**30, 3),  # the whole checkpoint
               "write_started": sv.write_started, "write_ended": sv.write_ended, "time": time.time()}
        self.pending_records.append(rec)
        self.on_saved(rec)
        how = (f"in the background: training blocked {sv.blocked_s:.2f}s, written in {sv.write_s or 0:.1f}s"
               if sv.background else f"in {sv.blocked_s + (sv.write_s or 0):.1f}s")
        self.info(f"saved {final} {how}")

    def _fail(self) -> None:
        """Collective. Some rank's write (or rank 0's publish) failed: remove the folder, raise on every rank."""
        sv = self.in_flight or self._failed_save
        if sv is not None:
            # this rank's writer may still be writing into the folder (another rank failed first): let it end, so
            # that no file lands in the folder after it is removed (the gather below waits for every rank's)
            sv.done.wait()
        mine = (sv.step if sv is not None else -1, self._publish_error or (sv.error if sv is not None else None))
        errors = [mine]
        if self.world > 1:
            errors = [None] * self.world
            self.dist.all_gather_object(errors, mine)
        failed = [(f"rank {r}: {e}" if self.world > 1 else e) for r, (_, e) in enumerate(errors) if e]
        step = max(s for s, _ in errors)
        self.in_flight = None
        if self.is_main and sv is not None:
            shutil.rmtree(sv.tmp, ignore_errors=True)
        raise self._save_error(step, failed[0] if failed else "a writer failed")

    def _save_error(self, step: int, cause: str) -> SaveError:
        return SaveError(f"saving the step-{step} checkpoint failed: {cause}; the temporary folder was removed "
                         f"and the earlier checkpoints in {self.run_dir} are intact")

    def close(self) -> None:
        """Stop the writer thread (a save still in flight is abandoned: its folder never gets a marker)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
        self.release_lock()


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON values (tensors and arrays as lists, anything else unknown as its string)."""
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
