"""Multi-process training on CPU (2 ranks under torchrun, gloo, fp32, deterministic): resume, faults,
signals and elastic restarts. Each test launches `lamamba train` with LaMamba-debug at 32 px, global batch 8, 6 steps; uninterrupted
reference runs are shared through a module fixture. Faults are injected with LAMAMBA_FAULT (see trainer.py).
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import (DEBUG_CONFIG, ROOT, assert_same_tensors, launch, losses, optimizer_tensors, raw,
                           read_only_folder, step_dir, train_env, weights)

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 2-rank runs of STEPS steps, one per ZeRO stage, built on first use."""
    cache: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in cache:
            d = tmp_path_factory.mktemp(f"ref_zero{stage}")
            res = launch(d, 2, (f"train.steps={STEPS}", "checkpoint.every=3", f"train.zero_stage={stage}", "train.log_every=1"))
            assert res.returncode == 0, res.log
            cache[stage] = d
        return cache[stage]

    return get


def assert_equivalent(run: Path, ref: Path, exact: bool = True):
    """Same losses at every logged step, same final weights, EMA and optimizer state."""
    lr, lf = losses(run), losses(ref)
    assert sorted(lr) == sorted(lf) == list(range(1, STEPS + 1))
    for s in lf:
        for v in lr[s]:
            if exact:
                assert v == lf[s][0], f"step {s}: loss {v!r} != uninterrupted {lf[s][0]!r}"
            else:
                assert abs(v - lf[s][0]) <= 1e-5 * abs(lf[s][0]), f"step {s}: loss {v!r} vs {lf[s][0]!r}"
    a, b = step_dir(run, STEPS), step_dir(ref, STEPS)
    tol = dict(exact=exact, rtol=1e-4, atol=1e-6)
    assert_same_tensors(raw(a), raw(b), "weights", **tol)
    assert_same_tensors(weights(a / "ema.safetensors"), weights(b / "ema.safetensors"), "EMA", **tol)
    if exact:
        assert_same_tensors(optimizer_tensors(a), optimizer_tensors(b), "optimizer state")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, reference, stage):
    """ZeRO-1/2/3: 6 steps uninterrupted == 4 steps, SIGKILL (checkpoint at 3), rerun of the same command."""
    # the step-3 save is written at once: a background one can still be writing when the kill comes on a loaded
    # machine (kills around background saves: test_kills_around_a_background_save_resume_from_the_right_checkpoint)
    sets = (f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.background=false", f"train.zero_stage={stage}",
            "train.log_every=1")
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "step:4"})
    assert res.returncode != 0 and "SIGKILL at step step 4" in res.stderr, res.log
    assert not step_dir(tmp_path, 6).exists() and step_dir(tmp_path, 3).is_dir()
    res = launch(tmp_path, 2, sets)
    assert res.returncode == 0, res.log
    assert "resumed from" in res.stderr and "step_00000003" in res.stderr, res.log
    resumes = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines() if '"resume"' in l]
    assert [(r["event"], r["step"], r["from"], r["world_size"]) for r in resumes] == \
        [("resume", 3, "step_00000003", 2)] and resumes[0]["host"], resumes
    assert_equivalent(tmp_path, reference(stage))


def test_sigkill_during_save_and_damaged_checkpoints_fall_back(tmp_path, reference):
    sets = (f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2", "train.zero_stage=2", "train.log_every=1")
    # 1. killed after the step-4 files are written, before the completion marker.
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "save_before_marker:4"})
    assert res.returncode != 0 and "SIGKILL at save_before_marker" in res.stderr, res.log
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers and not step_dir(tmp_path, 4).exists(), sorted(p.name for p in tmp_path.iterdir())
    # 2. the rerun resumes from step 2, removes the leftovers and reaches the uninterrupted result.
    res = launch(tmp_path, 2, sets)
    assert res.returncode == 0, res.log
    assert "resumed from" in res.stderr and "step_00000002" in res.stderr, res.log
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert_equivalent(tmp_path, reference(2))
    # 3. newest checkpoint truncated: the rerun warns, resumes from step 4 and re-does steps 5-6 identically.
    victim = sorted((step_dir(tmp_path, 6) / "ds" / "state").glob("*optim_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    res = launch(tmp_path, 2, sets)
    assert res.returncode == 0, res.log
    assert "step_00000006 is not usable" in res.stderr and "truncated" in res.stderr, res.log
    assert "resumed from" in res.stderr and "step_00000004" in res.stderr, res.log
    assert_equivalent(tmp_path, reference(2))
    # (A missing file, a flipped byte and a broken marker take the same path: tests/train/test_train_units.py.)


@pytest.mark.parametrize("stage,first,second", [(3, 2, 1), (2, 1, 2)], ids=["zero3_2to1", "zero2_1to2"])
def test_elastic_resume_on_another_world_size(tmp_path, reference, stage, first, second):
    """Saved on `first` ranks, resumed on `second`: parameters, Adam moments, EMA and data position survive,
    so the losses and weights match the uninterrupted 2-rank run up to reduction order."""
    sets = (f"train.steps={STEPS}", "checkpoint.every=3", f"train.zero_stage={stage}", "train.log_every=1")
    res = launch(tmp_path, first, sets + ("train.exit_after=3",))
    assert "exit_after = 3 steps reached" in res.stderr, res.log
    state = json.loads((step_dir(tmp_path, 3) / "trainer_state.json").read_text())
    assert state["world_size"] == first and state["images_seen"] == 24
    res = launch(tmp_path, second, sets)
    assert res.returncode == 0, res.log
    assert f"elastic {first} -> {second} ranks" in res.stderr, res.log
    final = json.loads((step_dir(tmp_path, STEPS) / "trainer_state.json").read_text())
    assert final["world_size"] == second and final["images_seen"] == 8 * STEPS
    assert final["loader_state"]["images_seen"] == 8 * STEPS
    # A lost Adam state or EMA would show up as a large jump at step 4; reduction order only as ~1e-7.
    assert_equivalent(tmp_path, reference(2 if stage == 2 else 3), exact=False)


def test_wandb_with_bogus_key_and_no_network_completes_offline_and_keeps_run_id(tmp_path):
    env = {"WANDB_API_KEY": "bogus" * 8, "WANDB_BASE_URL": "http://127.0.0.1:9"}  # port 9: nothing listens
    sets = ("train.steps=4", "checkpoint.every=2", "train.exit_after=2", "logging.wandb=true", "train.log_every=1")
    res = launch(tmp_path, 1, sets, env=env, drop_env=("WANDB_MODE", "WANDB_DIR"))
    assert "exit_after = 2 steps reached" in res.stderr, res.log
    run_id = json.loads((step_dir(tmp_path, 2) / "trainer_state.json").read_text())["wandb_run_id"]
    assert run_id and f"wandb: run {run_id} (offline)" in res.stderr, res.log
    res = launch(tmp_path, 1, sets, env=env, drop_env=("WANDB_MODE", "WANDB_DIR"))
    assert res.returncode == 0, res.log
    assert json.loads((step_dir(tmp_path, 4) / "trainer_state.json").read_text())["wandb_run_id"] == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs


def test_nonfinite_loss_skips_the_step_then_rolls_back(tmp_path):
    """NaN latents on rank 1 only: both ranks skip step 4 (weights, EMA and Adam state unchanged), keys are
    logged; two NaN steps in a row (6, 7) roll back to the step-5 checkpoint and training still finishes."""
    sets = ("train.steps=8", "checkpoint.every=1", "checkpoint.keep=20", "train.zero_stage=2",
            "train.max_nonfinite_in_row=2", "train.log_every=1")
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "nan:3:1,nan:5-6:1"})
    assert res.returncode == 0, res.log
    a, b = step_dir(tmp_path, 3), step_dir(tmp_path, 4)
    assert_same_tensors(raw(a), raw(b), "weights after a skipped step")
    assert_same_tensors(weights(a / "ema.safetensors"), weights(b / "ema.safetensors"), "EMA after a skipped step")
    assert_same_tensors(optimizer_tensors(a), optimizer_tensors(b), "optimizer after a skipped step")
    events = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines() if '"nonfinite"' in l]
    assert [e["step"] for e in events] == [4, 6, 7]
    assert all(e["keys"] and all(k.startswith("synthetic-") for k in e["keys"]) for e in events)
    assert "rolling back to step_00000005" in res.stderr, res.log
    st = json.loads((step_dir(tmp_path, 8) / "trainer_state.json").read_text())
    assert st["step"] == 8 and st["rollbacks"] == 1
    assert all(v.isfinite().all() for v in raw(step_dir(tmp_path, 8)).values())


def _assert_same_end(run: Path, ref: Path, steps: int):
    """Same final weights, EMA and optimizer state (bitwise), and every logged loss of ``run`` (the mean over the
    steps since its previous log line) equal to the same mean of ``ref``'s per-step losses."""
    lr, lf = losses(run), losses(ref)
    assert sorted(lf) == list(range(1, steps + 1)), lf
    prev = 0
    for s in sorted(lr):
        acc = 0.0
        for k in range(prev + 1, s + 1):
            acc += lf[k][0]
        assert lr[s][-1] == acc / (s - prev), f"step {s}: logged {lr[s][-1]!r}, per-step mean {acc / (s - prev)!r}"
        prev = s
    a, b = step_dir(run, steps), step_dir(ref, steps)
    assert_same_tensors(raw(a), raw(b), "weights")
    assert_same_tensors(weights(a / "ema.safetensors"), weights(b / "ema.safetensors"), "EMA")
    assert_same_tensors(optimizer_tensors(a), optimizer_tensors(b), "optimizer state")


def test_steps_settled_late_train_bitwise_like_steps_settled_at_once(tmp_path, reference):
    """Steps with nothing due are settled during the next step (trainer.py queue_step): log lines every 3 steps
    (steps 1, 2, 4, 5 settled late), killed after step 4 and resumed, give the run that settles every step at
    once, bit for bit."""
    sets = (f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.background=false", "train.zero_stage=2",
            "train.log_every=3")  # the step-3 save written at once (see test_resume_after_sigkill_is_bitwise_identical)
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "step:4"})
    assert res.returncode != 0 and "SIGKILL at step step 4" in res.stderr, res.log
    res = launch(tmp_path, 2, sets)
    assert res.returncode == 0 and "step_00000003" in res.stderr, res.log
    _assert_same_end(tmp_path, reference(2), STEPS)


def test_a_nonfinite_step_settled_late_is_skipped_like_one_settled_at_once(tmp_path):
    """NaN latents on rank 1 at step 3, which nothing is due at (settled during step 4): skipped and logged as
    when every step is settled at once; the two runs end bitwise equal."""
    runs = {}
    for log_every in (1, 4):
        d = tmp_path / f"log{log_every}"
        res = launch(d, 2, ("train.steps=8", "checkpoint.every=4", "train.zero_stage=2", f"train.log_every={log_every}"),
                     env={"LAMAMBA_FAULT": "nan:2:1"})
        assert res.returncode == 0, res.log
        events = [json.loads(l) for l in (d / "stats.jsonl").read_text().splitlines() if '"nonfinite"' in l]
        assert [e["step"] for e in events] == [3], events
        runs[log_every] = d
    a, b = step_dir(runs[4], 8), step_dir(runs[1], 8)
    assert_same_tensors(raw(a), raw(b), "weights")
    assert_same_tensors(weights(a / "ema.safetensors"), weights(b / "ema.safetensors"), "EMA")
    assert_same_tensors(optimizer_tensors(a), optimizer_tensors(b), "optimizer state")


def _rank_pids(parent: int) -> dict[int, int]:
    """RANK -> pid of the torchrun workers below ``parent`` (read from /proc)."""
    out, todo = {}, [parent]
    while todo:
        pid = todo.pop()
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            todo.append(k)
            try:
                env = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for e in env:
                if e.startswith(b"RANK="):
                    out[int(e[5:])] = k
    return out


@pytest.mark.parametrize("log_every", [1, 7], ids=["settled_at_once", "settled_late"])
def test_signal_saves_on_every_rank_and_exits_for_requeue(tmp_path, log_every, sig="SIGUSR2"):
    """SIGUSR2 reaches rank 1 only: both ranks agree at the next step boundary, save one complete
    checkpoint and exit with EXIT_REQUEUE (3); rerunning the command continues from it. (SIGTERM goes
    through the same handler: tests/train/test_train_units.py.) With log lines every 7 steps most steps are settled
    during the next one (trainer.py queue_step): the stop is seen a step later, and acted on at once."""
    import signal
    import subprocess
    import sys
    import time

    from train_helpers import DEBUG_CONFIG, ROOT, train_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lamamba_dist.cli",
           "train", "--config", str(DEBUG_CONFIG), "--set", f'checkpoint.dir="{tmp_path}"', "--set", "train.steps=500",
           "--set", "checkpoint.every=1000", "--set", f"train.log_every={log_every}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stats = tmp_path / "stats.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (stats.is_file() and len(stats.read_text().splitlines()) >= 2):
            time.sleep(0.5)
        pids = _rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        import os

        os.kill(pids[1], getattr(signal, sig))
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err[-6000:]
    assert f"stop requested (signal {sig}" in err or "stop requested" in err, log
    assert "exitcode  : 3" in err or proc.returncode == 3, log  # torchrun reports the workers' exit code 3
    saved = sorted(p.name for p in tmp_path.glob("step_*"))
    assert len(saved) == 1 and (tmp_path / saved[0] / "COMPLETE.json").is_file(), saved
    step = int(saved[0].split("_")[1])
    assert 2 <= step < 500
    res = launch(tmp_path, 2, (f"train.steps={step + 1}", "checkpoint.every=1000"))
    assert res.returncode == 0 and f"step_{step:08d}" in res.stderr, res.log


def _start_single(tmp_path, steps=500, env=None):
    """`lamamba train` in one process (a 1-rank group) with loader workers, in its own process group (a terminal)."""
    cmd = [sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG), "--set",
           f'checkpoint.dir="{tmp_path}"', "--set", f"train.steps={steps}", "--set", "checkpoint.every=1000",
           "--set", "train.log_every=1", "--set", "data.num_workers=2", "--set", "train.global_batch=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    stats = tmp_path / "stats.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (stats.is_file() and len(stats.read_text().splitlines()) >= 2):
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    return proc


def test_first_ctrl_c_saves_and_exits_for_requeue_a_second_exits_at_once(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group, loader workers included): the first saves at the next
    step boundary and exits 3 (a second SIGINT right after it, as torchrun forwards the one it got, is the same
    Ctrl-C); a second Ctrl-C exits at once (130) without writing a checkpoint."""
    import os
    import signal as sig

    proc = _start_single(tmp_path / "once")
    os.killpg(proc.pid, sig.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, sig.SIGINT)  # within the debounce window: the same Ctrl-C
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 3, err[-4000:]
    assert "SIGINT: saving at the next step boundary" in err and "stop requested (signal SIGINT)" in err, err[-4000:]
    saved = sorted((tmp_path / "once").glob("step_*"))
    last = max(json.loads(l)["step"] for l in (tmp_path / "once" / "stats.jsonl").read_text().splitlines())
    assert [p.name for p in saved] == [f"step_{last:08d}"] and (saved[0] / "COMPLETE.json").is_file(), (saved, last)

    proc = _start_single(tmp_path / "twice", env={"LAMAMBA_SIGINT_DEBOUNCE_S": "0"})
    os.killpg(proc.pid, sig.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, sig.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-4000:]
    assert "interrupted (second SIGINT): exited without saving" in err, err[-4000:]
    # No checkpoint published. The first Ctrl-C may have started a save at a step boundary before the second
    # arrived: its temporary folder can stay behind (never marked complete; the next start removes it).
    left = list((tmp_path / "twice").glob("step_*"))
    assert all(".tmp-" in p.name and not (p / "COMPLETE.json").exists() for p in left), \
        f"a second Ctrl-C must not save: {left}"


def test_no_silent_start_from_scratch_over_damaged_checkpoints(tmp_path):
    """Every step folder damaged: training refuses (rc 2) and lists them; --move-damaged-aside keeps them under
    damaged/ and starts at step 0."""
    sets = ("train.steps=2", "checkpoint.every=1", "train.global_batch=2", "checkpoint.keep=2")
    res = launch(tmp_path, 1, sets)
    assert res.returncode == 0, res.log
    for s in (1, 2):
        f = step_dir(tmp_path, s) / "ema.safetensors"
        f.write_bytes(f.read_bytes()[:-10])
    def single(*extra):  # one process (torchrun would turn the exit code 2 into 1)
        return subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG),
                               "--set", f'checkpoint.dir="{tmp_path}"', *[a for s in sets for a in ("--set", s)],
                               *extra], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)

    res = single()
    assert res.returncode == 2, res.stderr[-4000:]
    err = res.stderr.strip().splitlines()[-1]
    assert "2 checkpoint folder(s) and none verifies" in err and "step_00000001: file ema.safetensors has" in err \
        and "--move-damaged-aside" in err, err
    assert step_dir(tmp_path, 1).is_dir() and step_dir(tmp_path, 2).is_dir()  # untouched
    res = single("--move-damaged-aside")
    assert res.returncode == 0, res.stderr[-4000:]
    aside = sorted(p.name for p in (tmp_path / "damaged").iterdir())
    assert len(aside) == 2 and aside[0].startswith("step_00000001-") and aside[1].startswith("step_00000002-"), aside
    assert "resumed from" not in res.stderr and "moved the damaged checkpoint step_00000001 aside" in res.stderr
    assert json.loads((step_dir(tmp_path, 2) / "trainer_state.json").read_text())["step"] == 2


def test_one_trainer_per_run_folder_and_a_killed_holder_is_taken_over(tmp_path):
    """A second `lamamba train` on a running run folder refuses (rc 2) naming the holder; after the holder is
    killed with SIGKILL its lock is stale, and the rerun takes it over and resumes."""
    import os
    import signal as sig

    first = _start_single(tmp_path, steps=500)
    try:
        second = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG),
                                 "--set", f'checkpoint.dir="{tmp_path}"', "--set", "train.steps=3"], cwd=ROOT,
                                env=train_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        err = second.stderr.strip().splitlines()[-1]
        assert "another lamamba train holds" in err and f"PID {first.pid}" in err, err
    finally:
        os.killpg(first.pid, sig.SIGKILL)
        first.communicate(timeout=60)
    third = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG),
                            "--set", f'checkpoint.dir="{tmp_path}"', "--set", "train.steps=3", "--set",
                            "train.global_batch=2"], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "taking over the stale lock" in third.stderr and f"PID {first.pid} no longer runs" in third.stderr
    assert not (tmp_path / ".lock").exists()


def test_a_full_disk_at_a_save_is_one_line_and_loses_nothing(tmp_path):
    """The disk fills up while the step-4 checkpoint is written: exit 1 with one line naming the file and "No space
    left on device", no temporary folder left, the step-2 checkpoint intact and resumable."""
    sets = ("train.steps=6", "checkpoint.every=2", "train.global_batch=2", "checkpoint.keep=3")
    res = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG), "--set",
                          f'checkpoint.dir="{tmp_path}"', *[a for s in sets for a in ("--set", s)]], cwd=ROOT,
                         env=train_env({"LAMAMBA_FAULT": "enospc:4"}), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-4000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("lamamba train: error: saving the step-4 checkpoint failed:") and \
        "ema.safetensors: No space left on device" in last and "earlier checkpoints" in last, last
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    from lamamba_dist.train import checkpoint as ckpt

    assert ckpt.verify_checkpoint(step_dir(tmp_path, 2)) is None
    res = launch(tmp_path, 1, sets)  # the disk has room again: resume from step 2
    assert res.returncode == 0 and "step_00000002" in res.stderr, res.log


def test_a_run_folder_that_cannot_be_written_is_refused_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    def train(run):
        return subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG),
                               "--set", f'checkpoint.dir="{run}"', "--set", "train.steps=2"], cwd=ROOT,
                              env=train_env(), capture_output=True, text=True, timeout=300)

    res = train(blocker)
    assert res.returncode == 2 and "is an existing file, not a folder" in res.stderr.strip().splitlines()[-1], \
        res.stderr[-3000:]
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_folder(ro) as denied:
        res = train(ro)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and f"is not writable ({denied})" in last, res.stderr[-3000:]
    assert "step 1" not in res.stderr and not list(ro.iterdir())


# --------------------------------------------------------------------------- background saves (checkpointing.py)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_kills_around_a_background_save_resume_from_the_right_checkpoint(tmp_path, reference, stage):
    """Periodic saves are written in the background. SIGKILL right after the step-2 checkpoint is published: the
    rerun resumes from it. SIGKILL while the step-4 one is being written (training has moved on): the rerun
    resumes from step 2 again, and the end result is bitwise the uninterrupted run's."""
    sets = (f"train.steps={STEPS}", "checkpoint.every=2", f"train.zero_stage={stage}", "train.log_every=1")
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "save_after_marker:2"})
    assert res.returncode != 0 and "SIGKILL at save_after_marker step 2" in res.stderr, res.log
    from lamamba_dist.train import checkpoint as ckpt

    assert ckpt.verify_checkpoint(step_dir(tmp_path, 2)) is None
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "save_write:4"})
    assert res.returncode != 0 and "SIGKILL at save_write step 4" in res.stderr, res.log
    assert "resumed from" in res.stderr and "step_00000002" in res.stderr, res.log
    assert not step_dir(tmp_path, 4).exists() and [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    res = launch(tmp_path, 2, sets)
    assert res.returncode == 0, res.log
    assert "resumed from" in res.stderr and "step_00000002" in res.stderr, res.log
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    saves = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines() if '"checkpoint"' in l]
    assert [(s["step"], s["background"]) for s in saves][-2:] == [(4, True), (6, False)], saves
    assert_equivalent(tmp_path, reference(stage))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_failed_background_write_on_another_rank_ends_the_run_and_loses_nothing(tmp_path, stage):
    """Rank 1's disk fills up while it writes the step-4 checkpoint in the background: the run ends with exit 1
    and an error naming the file, the temporary folder is removed, the step-2 checkpoint is intact."""
    sets = ("train.steps=6", "checkpoint.every=2", f"train.zero_stage={stage}", "train.log_every=1")
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "enospc:4:1"})
    assert res.returncode != 0, res.log
    assert "saving the step-4 checkpoint failed: rank 1:" in res.stderr and "No space left on device" in res.stderr \
        and "rank_00001.pt" in res.stderr and "earlier checkpoints" in res.stderr, res.log
    # (torchrun prints a traceback of its own when a worker exits 1; none comes from our code)
    assert not [l for l in res.stderr.splitlines() if l.strip().startswith("File ") and "/lamamba_dist/" in l], res.log
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    from lamamba_dist.train import checkpoint as ckpt

    assert ckpt.verify_checkpoint(step_dir(tmp_path, 2)) is None


def test_saves_in_quick_succession_never_write_at_once(tmp_path):
    """A save every step with a slow writer (2 s): each save waits for the one before, the wait is reported, and
    the writes never overlap."""
    sets = ("train.steps=4", "checkpoint.every=1", "checkpoint.keep=10", "train.zero_stage=2", "train.log_every=1")
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "slow_write:1-3"})
    assert res.returncode == 0, res.log
    recs = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    assert [s["step"] for s in saves] == [1, 2, 3, 4], saves
    for prev, nxt in zip(saves, saves[1:]):
        assert nxt["write_started"] >= prev["write_ended"], (prev, nxt)
    assert all(s["wait_s"] > 0.5 for s in saves[1:]), saves  # each waited for the slow write before it
    status = [r for r in recs if "ckpt_blocked_s" in r]
    assert status and all(r["ckpt_blocked_s"] >= 0 and r["ckpt_write_s"] >= 0 for r in status), status


# --------------------------------------------------------------------------- sample grids during training (watch.py)


def test_sample_grids_on_time_and_resume_is_bitwise_the_run_without_sampling(tmp_path, reference):
    """[train] sample_every = 2 on 2 ranks: grids at steps 2, 4, 6 (8 classes x 4), the step-4 grid the same after
    a kill -9 and resume, and losses, weights, EMA and optimizer state bitwise those of the run without sampling."""
    from PIL import Image

    sets = (f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.background=false", "train.zero_stage=2",
            "train.log_every=1", "train.sample_every=2", "train.sample_steps=4")  # (step-3 save at once: see above)
    res = launch(tmp_path, 2, sets, env={"LAMAMBA_FAULT": "step:4"})
    assert res.returncode != 0 and "SIGKILL at step step 4" in res.stderr, res.log
    grids = tmp_path / "samples"
    assert sorted(p.name for p in grids.iterdir()) == ["step_00000002.png", "step_00000004.png"]
    first = (grids / "step_00000004.png").read_bytes()
    res = launch(tmp_path, 2, sets)
    assert res.returncode == 0 and "step_00000003" in res.stderr, res.log
    assert sorted(p.name for p in grids.iterdir()) == [f"step_{s:08d}.png" for s in (2, 4, 6)]
    assert (grids / "step_00000004.png").read_bytes() == first  # the same EMA weights, the same fixed noise
    im = Image.open(grids / "step_00000006.png")
    assert im.size == (4 * (16 + 2) + 2, 8 * (16 + 2) + 2)  # 4 per class x 8 classes, 4x4 latents shown 4x
    recs = [json.loads(l) for l in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("event") == "samples"] == [2, 4, 4, 6]
    assert_equivalent(tmp_path, reference(2))
