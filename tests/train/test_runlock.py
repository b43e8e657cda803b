"""One writer per run folder (lamamba_dist/runlock.py): refusals name the holder, stale locks are taken over."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from lamamba_dist.runlock import LOCK_NAME, LockedError, RunLock


def _write_owner(folder, **owner):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"time": time.time(), **owner}))


def test_second_holder_is_refused_with_the_holders_identity(tmp_path):
    with RunLock(tmp_path, "lamamba train") as lock:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid() and lock.held
        with pytest.raises(LockedError, match=rf"another lamamba train holds .*host {socket.gethostname()}, "
                                              rf"PID {os.getpid()}"):
            RunLock(tmp_path, "lamamba train").acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    _write_owner(tmp_path, host=socket.gethostname(), pid=int(dead))
    logs = []
    with RunLock(tmp_path, log=logs.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(logs) == 1 and f"PID {dead} no longer runs on this host" in logs[0]


def test_a_requeued_slurm_job_never_locks_itself_out(tmp_path, monkeypatch):
    _write_owner(tmp_path, host="node-that-died", pid=4242, slurm_job_id="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    logs = []
    with RunLock(tmp_path, log=logs.append):
        pass
    assert "taken by this Slurm job (77) before a requeue" in logs[0]


def test_a_live_lock_elsewhere_and_a_fresh_torn_lock_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_owner(tmp_path, host="other-node", pid=1)  # cannot be checked from here: refused
    with pytest.raises(LockedError, match="host other-node, PID 1"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text("")  # a holder killed between create and write, just now: refused
    with pytest.raises(LockedError):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))  # ... an hour ago: stale
    logs = []
    with RunLock(tmp_path, log=logs.append):
        pass
    assert "unreadable" in logs[0]


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    lock = RunLock(tmp_path).acquire()
    _write_owner(tmp_path, host="other-node", pid=1)  # e.g. removed by hand and taken by another job
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "other-node"
