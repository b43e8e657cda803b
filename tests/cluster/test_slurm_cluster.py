"""Tests on a real one-node Slurm (cluster/slurm_harness.sh): a 2-task DeepSpeed job, and the preemption drill.

Start the cluster first (`bash cluster/slurm_harness.sh start`; scripts/test.sh does it when it runs as root with
apt). Without it these tests skip, naming the reason; under CI=true they fail instead.

(a) `lamamba submit` runs the debug model on 2 tasks (DeepSpeed ZeRO-2, gloo, CPU) to the end. Its final
    weights are the uninterrupted reference of (b).
(b) The drill: the same training in the preemptible partition is preempted twice by high-priority jobs and hits
    its time limit once (the test shortens the running job's limit with `scontrol update`, so Slurm's own
    time-limit signal fires mid-run; the limit is restored once the job has requeued). Every stop saves, requeues
    and resumes; the job must end with exactly the configured steps and bit-identical weights (raw and EMA).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lamamba_dist.cluster import launcher, slurm

REPO = Path(__file__).resolve().parents[2]
HARNESS_CONF = REPO / ".cache" / "slurm" / "etc" / "slurm.conf"
STEPS = 70
DRILL_TIME_MIN = 10
DRILL_SIGNAL_DELAY_S = 160

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CONFIG = f"""\
# The debug model at 32 px on 2 CPU ranks, deterministic fp32 (tests/cluster/test_slurm_cluster.py).
[model]
name = "LaMamba-debug"
resolution = 32
num_classes = 10

[data]
shards = "synthetic"
num_workers = 0
num_streams = 2
synthetic_num_classes = 10

[train]
global_batch = 8
micro_batch = 2
steps = {STEPS}
precision = "fp32"
zero_stage = 2
seed = 0
deterministic = true
log_every = 1

[checkpoint]
dir = "run"
every = 1000
keep = 2
"""


# --------------------------------------------------------------------------- cluster discovery


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return ("no Slurm client commands: start the test cluster with `bash cluster/slurm_harness.sh start` "
                "(needs root and apt-get)")
    try:
        parts = slurm.partitions()
    except slurm.SlurmError as e:
        return f"Slurm is installed but not answering ({e}); run `bash cluster/slurm_harness.sh start`"
    missing = {"low", "high"} - set(parts)
    if missing:
        return f"this Slurm has no partition(s) {sorted(missing)}: not the harness cluster (cluster/slurm_harness.sh)"
    if parts["low"].max_cpus_per_node < 2:
        return "the Slurm node has fewer than 2 CPUs: the 2-task tests cannot run"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    saved = os.environ.get("SLURM_CONF")
    if saved is None and HARNESS_CONF.is_file() and not Path("/etc/slurm/slurm.conf").exists():
        os.environ["SLURM_CONF"] = str(HARNESS_CONF)
    problem = _cluster_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the real Slurm is not usable: {problem}")
        pytest.skip(problem)
    # The jobs inherit this environment (sbatch --export=ALL): share the DeepSpeed JIT cache with scripts/test.sh.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("WANDB_MODE", "offline")
    yield
    if saved is None:
        os.environ.pop("SLURM_CONF", None)


# --------------------------------------------------------------------------- helpers


def _events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stats(run_dir: Path) -> list[dict]:
    """The step records of stats.jsonl (event records, such as a resume or a skipped step, left out)."""
    path = run_dir / "stats.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in recs if "event" not in r]


def _diagnose(job_dir: Path) -> str:
    out = [f"events: {json.dumps(_events(job_dir), indent=1)}"]
    for log in sorted((job_dir / "logs").glob("*_log.err")):
        out.append(f"--- {log.name} (tail)\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(out)


def _wait(what: str, cond, timeout: float, job_dir: Path, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{_diagnose(job_dir)}")


# Job states of a run that has not ended yet, as sacct reports them (`man sacct`, JOB STATE CODES).
_ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
                  "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _wait_job_gone(job_id: str, job_dir: Path, timeout: float) -> None:
    """Until the job has left the queue and accounting has recorded how its last run ended.

    slurmctld hands the end of a job to slurmdbd asynchronously, so sacct may still say RUNNING for a moment after
    squeue has forgotten the job."""
    _wait(f"job {job_id} to leave the queue", lambda: slurm.queue_state(job_id) is None, timeout, job_dir, poll=2)

    def settled():
        runs = slurm.job_history(job_id)
        return bool(runs) and runs[-1]["State"].split()[0] not in _ACTIVE_STATES

    _wait(f"accounting to record the end of job {job_id}", settled, 120, job_dir, poll=1)


def _event(job_dir: Path, kind: str, restart: int):
    for e in _events(job_dir):
        if e["event"] == kind and e["restart"] == restart:
            return e
    return None


def _final_step_dir(run_dir: Path) -> Path:
    done = sorted(p for p in run_dir.glob("step_*") if (p / "COMPLETE.json").is_file())
    assert done, f"no complete checkpoint in {run_dir}"
    return done[-1]


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _write_config(tmp: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / "drill.toml"
    p.write_text(CONFIG)
    return p


# --------------------------------------------------------------------------- (a) a 2-task job to the end


def submit_reference(base: Path, *placement: str) -> dict:
    """`lamamba submit` of the drill config with ``placement`` (e.g. ``--tasks-per-node 2``) in the high
    partition (which preempts nothing here), waited for to its end: the uninterrupted run a drill compares with."""
    from lamamba_dist.cli import main as cli_main

    cfg = _write_config(base)
    run_dir, job_dir = base / "run", base / "job"
    rc = cli_main(["submit", "--config", str(cfg), "--set", f'checkpoint.dir="{run_dir}"', *placement,
                   "--partition", "high", "--time", "15", "--job-dir", str(job_dir), "--max-requeues", "0"])
    assert rc == 0
    job_id = json.loads((job_dir / "job.json").read_text())["job_id"]
    try:
        _wait_job_gone(job_id, job_dir, timeout=900)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    return {"job_id": job_id, "job_dir": job_dir, "run_dir": run_dir}


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    """The drill config on 2 tasks of the one node, uninterrupted."""
    return submit_reference(tmp_path_factory.mktemp("slurm_reference"), "--tasks-per-node", "2")


def test_two_task_deepspeed_job_trains_to_the_end(reference_run):
    import pickle

    job_id, job_dir, run_dir = reference_run["job_id"], reference_run["job_dir"], reference_run["run_dir"]
    runs = slurm.job_history(job_id)
    assert [r["State"] for r in runs] == ["COMPLETED"], _diagnose(job_dir)
    kinds = [e["event"] for e in _events(job_dir)]
    assert kinds == ["start", "finished"], _diagnose(job_dir)
    assert _events(job_dir)[0]["world_size"] == 2
    for rank in (0, 1):  # both ranks ran the job and returned through submitit
        with open(job_dir / "logs" / f"{job_id}_{rank}_result.pkl", "rb") as f:
            status, result = pickle.load(f)
        assert status == "success" and result["status"] == "finished", result
        assert (job_dir / "logs" / f"{job_id}_{rank}_log.err").is_file()
    final = _final_step_dir(run_dir)
    state = json.loads((final / "trainer_state.json").read_text())
    assert final.name == f"step_{STEPS:08d}" and state["step"] == STEPS
    assert state["world_size"] == 2 and state["zero_stage"] == 2 and state["images_seen"] == STEPS * 8
    assert (final / "rank_state" / "rank_00001.pt").is_file()
    assert [r["step"] for r in _stats(run_dir)] == list(range(1, STEPS + 1))
    assert "export DS_ACCELERATOR=cpu" in (job_dir / "sbatch.sh").read_text()
    # `lamamba status` reads the same folder.
    from lamamba_dist.cluster.commands import job_status

    st = job_status(job_dir)
    assert st["state"] == "COMPLETED" and st["restarts"] == 0 and st["checkpoints"][-1] == final.name


# --------------------------------------------------------------------------- (b) the preemption drill


def _preempt(job_dir: Path) -> str:
    """Submit a 1-CPU job to the high partition: the node is full, so Slurm preempts the drill job."""
    out = subprocess.run(["sbatch", "--parsable", "-p", "high", "-n", "1", "-c", "1", "-J", "lamamba-preemptor",
                          "-o", str(job_dir / "preemptor-%j.out"), "--wrap", "sleep 1"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _run_time_s(job_id: str) -> int:
    rec = slurm.show_job(job_id) or {}
    parts = [int(x) for x in rec.get("RunTime", "0:0:0").replace("-", ":").split(":")]
    secs = 0
    for p in parts:
        secs = secs * 60 + p
    return secs


@pytest.mark.timeout(1800)
def test_preemption_drill_requeues_resumes_and_matches_an_uninterrupted_run(reference_run, tmp_path):
    run_drill(reference_run["run_dir"], tmp_path, nodes=1, tasks_per_node=2)


def run_drill(reference_run_dir: Path, tmp_path: Path, nodes: int, tasks_per_node: int,
              cpus_per_task: int | None = None) -> None:
    """The drill on ``nodes`` x ``tasks_per_node`` tasks that fill the nodes (a 1-CPU job in `high` must preempt
    it); its final weights must equal those of ``reference_run_dir`` (an uninterrupted run of the same config on
    as many ranks). tests/cluster/test_slurm_multinode.py runs it across two nodes."""
    cfg = _write_config(tmp_path)
    run_dir, job_dir = tmp_path / "run", tmp_path / "job"
    req = launcher.SubmitRequest(
        config=str(cfg), overrides=[f'checkpoint.dir="{run_dir}"'], time_min=DRILL_TIME_MIN,
        signal_delay_s=DRILL_SIGNAL_DELAY_S, nodes=nodes, tasks_per_node=tasks_per_node,
        cpus_per_task=cpus_per_task, partition="low", job_dir=str(job_dir),
        max_requeues=10, entry="slurm_entry:run_training",
        env=[f"PYTHONPATH={REPO / 'tests' / 'helpers'}", "LAMAMBA_DRILL_STEP_SLEEP=0.5"],
    )
    sub = launcher.submit(req)
    job_id = sub.job_id
    preemptors = []
    try:
        for restart, action in enumerate(["preempt", "preempt", "time limit"]):
            start = _wait(f"run {restart} to start", lambda: _event(job_dir, "start", restart), 300, job_dir)
            # Let this run train two steps past the point it resumed from.
            first = _wait(f"run {restart} to train", lambda: [r for r in _stats(run_dir) if r["time"] > start["time"]],
                          300, job_dir)
            first_step = first[0]["step"]
            _wait(f"run {restart} to reach step {first_step + 1}",
                  lambda: any(r["step"] > first_step for r in _stats(run_dir) if r["time"] > start["time"]), 120, job_dir)
            if action == "preempt":
                preemptors.append(_preempt(job_dir))
            else:
                # Shorten the limit to 2-3 minutes from now. slurmctld checks time limits every 30 s and sends
                # the --signal once at most DRILL_SIGNAL_DELAY_S + 30 s are left: at its next check, here,
                # which leaves the job at least 90 s to save before the new limit.
                limit_min = math.ceil(_run_time_s(job_id) / 60) + 2
                subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_min}"], check=True)
            requeue = _wait(f"run {restart} to save and requeue", lambda: _event(job_dir, "requeue", restart),
                            240, job_dir)
            assert requeue["by"] == "scontrol requeue"
            if action == "time limit":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={DRILL_TIME_MIN}"], check=True)
        _wait_job_gone(job_id, job_dir, timeout=600)
    finally:
        subprocess.run(["scancel", job_id, *preemptors], capture_output=True)

    # What Slurm recorded: three runs requeued, the fourth completed; the preemptors ran.
    runs = slurm.job_history(job_id)
    assert [r["State"] for r in runs] == ["REQUEUED"] * 3 + ["COMPLETED"], _diagnose(job_dir)
    for pid in preemptors:
        _wait_job_gone(pid, job_dir, timeout=120)
        assert [r["State"] for r in slurm.job_history(pid)] == ["COMPLETED"]
    # What the job saw: Slurm's PreemptTime twice, its time limit once, each followed by a save and a requeue.
    stops = [e["reason"] for e in _events(job_dir) if e["event"] == "stop"]
    assert stops == ["preempted", "preempted", "time limit"], _diagnose(job_dir)
    assert [e["event"] for e in _events(job_dir)].count("finished") == 1
    assert all(e["trainer"] == "signal SIGUSR2" for e in _events(job_dir) if e["event"] == "stop")
    # Exactly the configured steps, each logged once: every requeued run resumed where its predecessor saved
    # (a run restarted from scratch, or from an older checkpoint, would log some steps twice).
    final = _final_step_dir(run_dir)
    state = json.loads((final / "trainer_state.json").read_text())
    assert final.name == f"step_{STEPS:08d}" and state["step"] == STEPS and state["images_seen"] == STEPS * 8
    assert [r["step"] for r in _stats(run_dir)] == list(range(1, STEPS + 1))
    starts = [e["time"] for e in _events(job_dir) if e["event"] == "start"]
    resumed_at = [min(r["step"] for r in _stats(run_dir) if r["time"] > t) - 1 for t in starts]
    assert resumed_at[0] == 0 and all(0 < a < b for a, b in zip(resumed_at[1:], resumed_at[2:] + [STEPS])), resumed_at
    # Bit-identical to the uninterrupted run: raw fp32 weights and EMA.
    ref_final = _final_step_dir(reference_run_dir)
    assert ref_final.name == final.name
    from lamamba_dist.train.checkpoint import raw_weights

    for name in ("raw weights", "ema.safetensors"):
        a, b = (_load(final / name), _load(ref_final / name)) if name.endswith(".safetensors") else \
            (raw_weights(final), raw_weights(ref_final))
        assert a.keys() == b.keys()
        diff = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a if not bool((a[k] == b[k]).all())}
        assert not diff, f"{name}: {len(diff)} tensors differ, max {max(diff.values()):.3e}"


# --------------------------------------------------------------------------- (c) no requeue: cancel --save, limit


@pytest.mark.timeout(900)
def test_cancel_save_and_requeue_limit_end_the_job_with_a_checkpoint(slurm_cluster, tmp_path):
    """`lamamba cancel --save` saves and ends without requeue; past --max-requeues a preempted job saves and ends."""
    from lamamba_dist.cli import main as cli_main

    cfg = _write_config(tmp_path)
    run_dir, job_dir = tmp_path / "run", tmp_path / "job"
    req = launcher.SubmitRequest(
        config=str(cfg), overrides=[f'checkpoint.dir="{run_dir}"'], time_min=10, signal_delay_s=60,
        tasks_per_node=2, partition="low", job_dir=str(job_dir), max_requeues=0, entry="slurm_entry:run_training",
        env=[f"PYTHONPATH={REPO / 'tests' / 'helpers'}", "LAMAMBA_DRILL_STEP_SLEEP=0.5"],
    )
    saved_steps = []
    preemptor = None
    for attempt, how in enumerate(["cancel --save", "preempted"]):
        job_id = launcher.submit(req).job_id
        try:
            start = _wait(f"job {job_id} to start", lambda: [e for e in _events(job_dir)
                                                            if e["event"] == "start" and e["job_id"] == job_id],
                          300, job_dir)[0]
            _wait(f"job {job_id} to train", lambda: [r for r in _stats(run_dir) if r["time"] > start["time"]],
                  300, job_dir)
            if how == "cancel --save":
                assert cli_main(["cancel", str(job_dir), "--save"]) == 0
            else:
                preemptor = _preempt(job_dir)
            _wait_job_gone(job_id, job_dir, timeout=300)
        finally:
            subprocess.run(["scancel", job_id], capture_output=True)
        mine = [e for e in _events(job_dir) if e["job_id"] == job_id]
        assert [e["event"] for e in mine] == ["start", "stop", "not_requeued"], _diagnose(job_dir)
        assert mine[1]["reason"] == how
        runs = slurm.job_history(job_id)
        assert len(runs) == 1, runs  # never requeued
        saved = _final_step_dir(run_dir)
        saved_steps.append(int(saved.name.split("_")[1]))
        assert 0 < saved_steps[-1] < STEPS
        assert max(r["step"] for r in _stats(run_dir)) == saved_steps[-1]  # saved exactly where it stopped
        if how == "cancel --save":
            assert runs[0]["State"] == "COMPLETED"
            assert "requeue limit" not in mine[2]["reason"]
        else:
            assert runs[0]["State"] == "FAILED"  # rank 0 reports the limit as an error
            assert mine[2]["reason"] == "requeue limit reached (0 of --max-requeues 0)"
    # The second job resumed from the first one's checkpoint.
    assert saved_steps[1] > saved_steps[0]
    if preemptor:
        subprocess.run(["scancel", preemptor], capture_output=True)
