"""Fault injection for the tests: ``LAMAMBA_FAULT`` makes a process die, a write fail or a batch turn NaN at a
chosen point (the points: :func:`fault_hit`). Unset, each hook costs one environment lookup."""

from __future__ import annotations

import os
import sys
import threading


def fault_hit(point: str, step: int) -> bool:
    """Test hook: ``LAMAMBA_FAULT=point:step[:rank][,point:step[:rank]...]`` (rank 0 by default).

    Points: ``step`` (SIGKILL before training step ``step + 1``), ``save_write`` (SIGKILL in the background
    writer of the step-``step`` checkpoint, after its first file), ``save_before_marker`` (SIGKILL after every
    file of the step-``step`` checkpoint is written, before its completion marker), ``save_after_marker``
    (SIGKILL once the step-``step`` checkpoint is published), ``slow_write`` (the writer of the step-``step``
    checkpoint sleeps 2 s first; ``step`` may be ``a-b``), ``nan`` (the latents of the batches of step ``step +
    1`` on that rank become NaN; ``step`` may be ``a-b``), ``enospc`` (writing the step-``step`` checkpoint fails
    with "No space left on device": rank 0's EMA file, another rank's rank-state file).
    """
    spec = os.environ.get("LAMAMBA_FAULT")
    if not spec:
        return False
    rank = int(os.environ.get("RANK", "0"))
    for item in spec.split(","):
        parts = item.split(":")
        if parts[0] != point:
            continue
        lo, _, hi = parts[1].partition("-")
        if int(lo) <= step <= int(hi or lo) and rank == (int(parts[2]) if len(parts) > 2 else 0):
            with _FAULT_LOCK:
                if (point, step) in _FAULTS_FIRED:  # each fault fires once per process (a rollback re-runs steps)
                    return False
                _FAULTS_FIRED.add((point, step))
            return True
    return False


_FAULTS_FIRED: set = set()
_FAULT_LOCK = threading.Lock()


def fault(point: str, step: int) -> None:
    if fault_hit(point, step):
        import signal

        sys.stderr.write(f"[fault injection] SIGKILL at {point} step {step}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def enospc(step: int, path) -> None:
    """Test hook (``LAMAMBA_FAULT=enospc:STEP[:RANK]``): the disk fills up while this rank writes ``path``."""
    if fault_hit("enospc", step):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
