"""Fault-tolerant checkpoint folders: write under a temporary name, mark complete last, load the newest valid one.

Layout of a run directory (``[checkpoint] dir``)::

    RUN/
      step_00001000/                  one folder per saved step
        ds/state/...                  DeepSpeed engine state (model, ZeRO optimizer partitions, scheduler)
        ds/latest                     (DeepSpeed's own tag file)
        ema.safetensors               EMA weights, full fp32, world-size independent (lamamba_dist.weights format)
        model.safetensors             raw fp32 (master) weights, full (only with [checkpoint] inference_weights;
                                      raw_weights() rebuilds them from ds/ otherwise)
        rank_state/rank_00000.pt      per-rank RNG states and data-loader state
        trainer_state.json            step, images seen, world size, ZeRO stage, model, config, wandb run id, ...
        COMPLETE.json                 written LAST: every file above with its size and sha256
      step_00002000/
      latest                          name of the newest complete checkpoint (convenience; not trusted on load)
      stats.jsonl                     one JSON line per log interval (rank 0)

A save is written to ``step_XXXXXXXX.tmp-<nonce>/`` (each rank's writer also leaves ``.digests/rank_XXXXX.json``
there, the sizes and sha256 of its files, merged into the marker and removed by rank 0: see checkpointing.py)
and renamed after ``COMPLETE.json`` is fsynced, so an
interrupted save (SIGKILL, node loss, full disk) never touches an earlier checkpoint. On load the folders are
tried newest first; one whose marker is missing, or whose files do not match the sizes (and hashes) in the
marker, is skipped with a warning naming the problem, and the previous one is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from lamamba_dist.hashing import sha256_file

if TYPE_CHECKING:
    import torch

MARKER = "COMPLETE.json"
STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
RAW_FILE = "model.safetensors"
DS_DIR = "ds"
DS_TAG = "state"
RANK_STATE_DIR = "rank_state"
LATEST = "latest"
FORMAT_VERSION = 1

_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^step_(\d{8,})\.tmp-[0-9a-z]+$")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete, damaged or inconsistent with the run."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_path(step_dir: Path, rank: int) -> Path:
    return Path(step_dir) / RANK_STATE_DIR / f"rank_{rank:05d}.pt"


# --------------------------------------------------------------------------- files and hashes


def list_files(root: Path) -> list[str]:
    """All regular files under ``root`` (relative, sorted), except the marker."""
    root = Path(root)
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def digest_files(root: Path, rel_paths: Iterable[str]) -> dict[str, dict[str, Any]]:
    root = Path(root)
    return {rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in rel_paths}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. some network filesystems
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to stable storage (before the marker is written)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:  # pragma: no cover
                continue
            try:
                os.fsync(fd)
            except OSError:  # pragma: no cover
                pass
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


# --------------------------------------------------------------------------- writing


def new_tmp_dir(run_dir: Path, step: int, nonce: str) -> Path:
    return Path(run_dir) / f"{step_dir_name(step)}.tmp-{nonce}"


def write_marker(tmp_dir: Path, digests: dict[str, dict[str, Any]], step: int) -> None:
    """Write ``COMPLETE.json`` (the last file of a checkpoint); ``digests`` must cover every file."""
    tmp_dir = Path(tmp_dir)
    missing = sorted(set(list_files(tmp_dir)) - set(digests))
    if missing:
        raise CheckpointError(f"{tmp_dir}: files without a digest: {', '.join(missing[:5])}")
    fsync_tree(tmp_dir)
    marker = {"format": FORMAT_VERSION, "step": step, "time": time.time(), "files": digests}
    atomic_write_text(tmp_dir / MARKER, json.dumps(marker, indent=1, sort_keys=True))


def publish(tmp_dir: Path, run_dir: Path, step: int) -> Path:
    """Rename a marked temporary folder to ``step_XXXXXXXX`` and point ``latest`` at it."""
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    if final.exists():
        reason = verify_checkpoint(final, hashes=False)
        if reason is not None:
            # A damaged folder of the same step (reported when the run resumed past it): kept, never overwritten.
            move_aside(final, run_dir, reason)
            os.replace(tmp_dir, final)
        else:
            # Same step saved again (e.g. a rollback re-reached it): move the old one aside, then delete it.
            trash = run_dir / f"{final.name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp_dir, final)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
    _fsync_dir(run_dir)
    atomic_write_text(run_dir / LATEST, final.name + "\n")
    return final


DAMAGED_DIR = "damaged"  # RUN/damaged/: step folders that failed verification and were moved aside


def move_aside(step_dir: Path, run_dir: Path, reason: str) -> Path:
    """Move a damaged step folder to ``RUN/damaged/<name>-<time>/`` (with a REASON.txt), never deleting it."""
    dest_root = Path(run_dir) / DAMAGED_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / f"{Path(step_dir).name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    os.replace(step_dir, dest)
    (dest / "REASON.txt").write_text(reason + "\n")
    _fsync_dir(Path(run_dir))
    return dest


def prune(run_dir: Path, keep: int, log: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Delete the oldest checkpoints so that the newest ``keep`` intact ones remain.

    Only folders whose files match the sizes in their marker count towards ``keep``, so pruning never leaves
    fewer than ``keep`` usable. Damaged folders older than the oldest kept one go too (retention treats them
    like any other old checkpoint); a damaged folder newer than that stays, and a save of its step moves it
    to ``RUN/damaged/`` rather than overwrite it.
    """
    keep = max(int(keep), 1)
    dirs = list_step_dirs(run_dir)
    valid = [(s, p) for s, p in dirs if verify_checkpoint(p, hashes=False) is None]
    removed = []
    for _, path in valid[:-keep] if len(valid) > keep else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log(f"removed old checkpoint {path.name}")
    if len(valid) >= keep:
        oldest_kept = valid[-keep][0]
        good = {p for _, p in valid}
        for s, path in dirs:
            if s < oldest_kept and path not in good:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
                log(f"removed old damaged checkpoint {path.name}")
    return removed


def remove_stale_tmp(run_dir: Path, log: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Delete leftovers of interrupted saves (``step_*.tmp-*``, ``step_*.old-*``). Call before any rank saves."""
    run_dir = Path(run_dir)
    removed = []
    if not run_dir.is_dir():
        return removed
    for p in sorted(run_dir.iterdir()):
        if p.is_dir() and (_TMP_RE.match(p.name) or re.match(r"^step_\d{8,}\.old-\d+$", p.name)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log(f"removed the leftovers of an interrupted save: {p.name}")
    return removed


# --------------------------------------------------------------------------- reading


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of folders that carry a completion marker, oldest first (not verified)."""
    return [(step, p) for step, p in list_step_dirs(run_dir) if (p / MARKER).is_file()]


def list_step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def verify_checkpoint(step_dir: Path, hashes: bool = True, only: Optional[set] = None) -> Optional[str]:
    """None when the folder is complete and intact, else a one-line reason.

    Every file's size is checked; with ``hashes`` its sha256 too, for every file or (``only``) for the files a
    reader will actually read (an export reads the weights, not the ~10 GB of DeepSpeed state)."""
    step_dir = Path(step_dir)
    marker_path = step_dir / MARKER
    if not marker_path.is_file():
        return f"no {MARKER} (the save did not finish)"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MARKER} is unreadable ({e})"
    if STATE_FILE not in files:
        return f"{MARKER} does not list {STATE_FILE}"
    for rel, info in sorted(files.items()):
        p = step_dir / rel
        if not p.is_file():
            return f"file missing: {rel}"
        size = p.stat().st_size
        if size != info.get("size"):
            return f"file {rel} has {size} bytes, the marker says {info.get('size')} (truncated or rewritten)"
    if hashes:
        for rel, info in sorted(files.items()):
            if only is not None and rel not in only:
                continue
            if "sha256" in info and sha256_file(step_dir / rel) != info["sha256"]:
                return f"file {rel} does not match its sha256 in {MARKER} (corrupted)"
    return None


def find_latest(run_dir: Path, hashes: bool = True, warn: Optional[Callable[[str], None]] = None,
                only: Optional[set] = None) -> Optional[Path]:
    """The newest step folder that verifies; every newer one that does not is reported through ``warn``, naming
    the folder used instead."""
    if warn is None:
        warn = lambda msg: warnings.warn(msg, stacklevel=2)  # noqa: E731
    skipped = []
    for step, path in reversed(list_step_dirs(run_dir)):
        reason = verify_checkpoint(path, hashes=hashes, only=only)
        if reason is None:
            for bad, why in skipped:
                warn(f"checkpoint {bad} is not usable: {why}; falling back to {path.name}")
            return path
        skipped.append((path, reason))
    for bad, why in skipped:
        warn(f"checkpoint {bad} is not usable: {why}; no older checkpoint verifies")
    return None


def damaged_checkpoints(run_dir: Path, hashes: bool = False) -> list[tuple[Path, str]]:
    """``(folder, reason)`` of every step folder that does not verify, oldest first."""
    out = []
    for _, path in list_step_dirs(run_dir):
        reason = verify_checkpoint(path, hashes=hashes)
        if reason is not None:
            out.append((path, reason))
    return out


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    path = Path(step_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({e})") from None


def resolve_checkpoint(path: Path, hashes: bool = True, only: Optional[set] = None,
                       warn: Optional[Callable[[str], None]] = None) -> Path:
    """``path`` is a run directory (-> newest checkpoint that verifies, newer damaged ones reported through
    ``warn``) or one step folder (-> verified as is: an error names what is wrong)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if (path / MARKER).is_file() or _STEP_RE.match(path.name):
        reason = verify_checkpoint(path, hashes=hashes, only=only)
        if reason:
            raise CheckpointError(f"{path}: {reason}")
        return path
    found = find_latest(path, hashes=hashes, warn=warn, only=only)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no step_XXXXXXXX folder with a valid {MARKER})")
    return found


def load_inference_weights(run_dir: str | Path, ema: bool = True, verify: bool = True,
                           warn: Optional[Callable[[str], None]] = None):
    """``(state_dict, meta)`` of the newest checkpoint of a run that verifies (or of one step folder).

    ``ema=True`` gives the EMA weights (what sampling should use), ``ema=False`` the raw fp32 weights (the
    checkpoint's model.safetensors, or, where ``[checkpoint] inference_weights`` was off, rebuilt from its
    DeepSpeed state: :func:`raw_weights`). The folder
    is verified as resume verifies it (every size in COMPLETE.json, and the sha256 of the files read);
    ``verify=False`` skips that and takes the newest folder that has the file (callers must say so loudly).
    ``meta`` follows :mod:`lamamba_dist.weights`: model, resolution, num_classes, learn_sigma, plus step,
    images_seen, ema (bool), ema_decay and the run directory.
    """
    from lamamba_dist.weights import load_weights

    rel = EMA_FILE if ema else RAW_FILE
    if verify:
        step_dir = resolve_checkpoint(Path(run_dir), hashes=True, only={rel, STATE_FILE}, warn=warn)
    else:
        path = Path(run_dir)
        if not path.exists():
            raise CheckpointError(f"{path}: no such run directory or checkpoint")
        has = lambda p: (p / rel).is_file() or (p / EMA_FILE).is_file()  # noqa: E731 (raw: rebuilt beside the EMA)
        cands = [path] if has(path) else [p for _, p in reversed(list_step_dirs(path)) if has(p)]
        if not cands:
            raise CheckpointError(f"{path}: no {rel} in it or in any step_XXXXXXXX folder")
        step_dir = cands[0]
    if ema or (step_dir / RAW_FILE).is_file():
        sd, meta = load_weights(step_dir / rel)
    else:  # no model.safetensors ([checkpoint] inference_weights off): rebuilt from the DeepSpeed state
        if verify:  # every file is read then: every file is hashed
            reason = verify_checkpoint(step_dir, hashes=True)
            if reason:
                raise CheckpointError(f"{step_dir}: {reason}")
        sd = raw_weights(step_dir)
        meta = dict(load_weights(step_dir / EMA_FILE)[1], ema=False)
    meta = dict(meta)
    meta["checkpoint"] = str(step_dir)
    return sd, meta


def raw_weights(step_dir: Path) -> dict[str, "torch.Tensor"]:
    """The raw fp32 weights of a checkpoint: its ``model.safetensors`` when written (``[checkpoint]
    inference_weights``), else rebuilt from the DeepSpeed state (the fp32 master weights of every ZeRO
    partition, DeepSpeed's zero_to_fp32; ZeRO-0: the engine's module weights). Persistent buffers and frozen
    parameters come from the EMA file, which holds them in full."""
    import torch

    from lamamba_dist.weights import load_weights

    step_dir = Path(step_dir)
    if (step_dir / RAW_FILE).is_file():
        return load_weights(step_dir / RAW_FILE)[0]
    ds_dir = step_dir / DS_DIR
    if any((ds_dir / DS_TAG).glob("*optim_states.pt")):
        import logging

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=DS_TAG)
    else:
        (f,) = sorted((ds_dir / DS_TAG).glob("mp_rank_*_model_states.pt"))[:1]
        sd = torch.load(f, map_location="cpu", weights_only=False)["module"]
    ema, _ = load_weights(step_dir / EMA_FILE)
    out = {k: v.float() for k, v in sd.items()}
    for k, v in ema.items():  # buffers and frozen parameters (the EMA covers only trainable ones)
        out.setdefault(k, v)
    return {k: out[k] for k in ema}
