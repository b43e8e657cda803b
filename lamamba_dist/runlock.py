"""One writer per folder: a lock file that records who holds it (host, PID, Slurm job), and stale-lock takeover.

``RUN/.lock`` is created with O_EXCL and holds JSON: host, pid, slurm_job_id, command, time. Another process
finding it refuses with a message that names the holder, unless the lock is stale:

* the holder ran on this host and its PID is gone (killed, crashed);
* the holder was this same Slurm job (``SLURM_JOB_ID``): a requeued job takes its own lock over, on any node;
* the holder was another Slurm job that Slurm no longer lists (``squeue -h -j ID`` prints nothing): finished.

A taken-over lock is reported through ``log``. :meth:`RunLock.release` removes the lock only while it is still
ours, and the context manager releases it on every exit path.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

LOCK_NAME = ".lock"
_HELD: set = set()  # this process's locks, released by release_all() (and at interpreter exit)


def release_all() -> None:
    """Release every lock this process holds (error paths that never reached the holder's own release)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)


class LockedError(RuntimeError):
    """The folder is held by another live process or job."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_job_listed(job_id: str) -> Optional[bool]:
    """True/False when squeue answers for the job, None when it cannot be asked."""
    if not shutil.which("squeue"):
        return None
    try:
        res = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:  # an unknown (long finished) job id is an error for squeue
        return False if "Invalid job id" in res.stderr else None
    return bool(res.stdout.strip())


def describe(owner: dict) -> str:
    parts = [f"host {owner.get('host', '?')}", f"PID {owner.get('pid', '?')}"]
    if owner.get("slurm_job_id"):
        parts.append(f"Slurm job {owner['slurm_job_id']}")
    if owner.get("time"):
        parts.append("since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"])))
    return ", ".join(parts)


class RunLock:
    """``with RunLock(folder, what="training run"):`` or :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: Path, what: str = "job", log: Callable[[str], None] = lambda s: None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.log = log
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID") or None,
                   "command": " ".join(sys.argv)[:500], "time": time.time()}
        self.held = False

    def _stale(self, owner: dict) -> Optional[str]:
        """Why ``owner``'s lock may be taken over, or None."""
        host, pid, job = owner.get("host"), owner.get("pid"), owner.get("slurm_job_id")
        if job and job == self.me["slurm_job_id"]:
            return f"it was taken by this Slurm job ({job}) before a requeue"
        if host == self.me["host"] and isinstance(pid, int) and not _alive(pid):
            return f"PID {pid} no longer runs on this host"
        if job and _slurm_job_listed(job) is False:
            return f"Slurm job {job} has finished"
        return None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text())
                    if not isinstance(owner, dict):
                        raise ValueError("not an object")
                except FileNotFoundError:
                    continue  # released meanwhile
                except (OSError, ValueError):  # empty or torn: a holder killed between create and write
                    owner = {"host": "?", "pid": "?", "unreadable": True}
                if owner.get("unreadable"):
                    try:
                        age = time.time() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    why = f"unreadable for {age:.0f} s" if age > 60 else None
                else:
                    why = self._stale(owner)
                if why is None:
                    raise LockedError(
                        f"{self.folder}: another {self.what} holds {self.path} ({describe(owner)}). Stop it first; if it "
                        f"is gone (a dead process on another host), delete {self.path}") from None
                self.log(f"taking over the stale lock {self.path} ({describe(owner)}): {why}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            _HELD.add(self)
            return self
        raise LockedError(f"{self.path}: cannot take the lock (it keeps coming back)")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(self)
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if owner.get("pid") == self.me["pid"] and owner.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
