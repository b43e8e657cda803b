"""Fault-tolerant checkpoint folders: write under a temporary name, mark complete last, load the newest valid one.

Layout of a run directory (``[checkpoint] dir``)::

    RUN/
      step_00001000/                  one folder per saved step
        ds/state/...                  DeepSpeed engine state (model, ZeRO optimizer partitions, scheduler)
        ds/latest                     (DeepSpeed's own tag file)
        ema.safetensors               EMA weights, full fp32, world-size independent (lamamba_dist.weights format)
        model.safetensors             raw fp32 (master) weights, full, world-size independent
        rank_state/rank_00000.pt      per-rank RNG states and data-loader state
        trainer_state.json            step, images seen, world size, ZeRO stage, model, config, wandb run id, ...
        COMPLETE.json                 written LAST: every file above with its size and sha256
      step_00002000/
      latest                          name of the newest complete checkpoint (convenience; not trusted on load)
      stats.jsonl                     one JSON line per log interval (rank 0)

A save is written to ``step_XXXXXXXX.tmp-<nonce>/`` and renamed after ``COMPLETE.json`` is fsynced, so an
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
from typing import Any, Callable, Iterable, Optional

from lamamba_dist.hashing import sha256_file

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


def prune(run_dir: Path, keep: int, log: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Delete the oldest complete checkpoints so that the newest ``keep`` intact ones remain.

    Only folders whose files match the sizes in their marker count towards ``keep``; damaged ones are
    left in place (reported when a resume skips them), so pruning never leaves fewer than ``keep`` usable.
    """
    keep = max(int(keep), 1)
    valid = [(s, p) for s, p in list_checkpoints(run_dir) if verify_checkpoint(p, hashes=False) is None]
    removed = []
    for _, path in valid[:-keep] if len(valid) > keep else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log(f"removed old checkpoint {path.name}")
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


def verify_checkpoint(step_dir: Path, hashes: bool = True) -> Optional[str]:
    """None when the folder is complete and intact, else a one-line reason."""
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
            if "sha256" in info and sha256_file(step_dir / rel) != info["sha256"]:
                return f"file {rel} does not match its sha256 in {MARKER} (corrupted)"
    return None


def find_latest(run_dir: Path, hashes: bool = True, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest step folder that verifies; every newer one that does not is reported through ``warn``."""
    if warn is None:
        warn = lambda msg: warnings.warn(msg, stacklevel=2)  # noqa: E731
    for step, path in reversed(list_step_dirs(run_dir)):
        reason = verify_checkpoint(path, hashes=hashes)
        if reason is None:
            return path
        warn(f"checkpoint {path} is not usable: {reason}; falling back to the previous one")
    return None


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    path = Path(step_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({e})") from None


def resolve_checkpoint(path: Path, hashes: bool = True) -> Path:
    """``path`` is a run directory (-> newest complete checkpoint) or one step folder (-> verified as is)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if (path / MARKER).is_file() or _STEP_RE.match(path.name):
        reason = verify_checkpoint(path, hashes=hashes)
        if reason:
            raise CheckpointError(f"{path}: {reason}")
        return path
    found = find_latest(path, hashes=hashes)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (no step_XXXXXXXX folder with a valid {MARKER})")
    return found


def load_inference_weights(run_dir: str | Path, ema: bool = True):
    """``(state_dict, meta)`` of the newest complete checkpoint of a run (or of one step folder).

    ``ema=True`` gives the EMA weights (what sampling should use), ``ema=False`` the raw fp32 weights.
    ``meta`` follows :mod:`lamamba_dist.weights`: model, resolution, num_classes, learn_sigma, plus step,
    images_seen, ema (bool), ema_decay and the run directory.
    """
    from lamamba_dist.weights import load_weights

    step_dir = resolve_checkpoint(Path(run_dir), hashes=False)
    sd, meta = load_weights(step_dir / (EMA_FILE if ema else RAW_FILE))
    meta = dict(meta)
    meta["checkpoint"] = str(step_dir)
    return sd, meta
