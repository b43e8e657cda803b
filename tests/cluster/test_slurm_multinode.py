"""Tests on a real two-node Slurm: `bash cluster/slurm_harness.sh start --nodes 2` (node1 and node2, each a
network namespace with its own address and hostname, on the host's filesystem; scripts/test.sh starts it for the
`multinode` tests after the rest of the suite).

Without such a cluster these tests skip, naming the reason (the rest of the suite runs on the one-node cluster);
with LAMAMBA_MULTINODE_REQUIRED=1 (scripts/test.sh's multi-node phase) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.multinode]


def _nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or "sinfo failed")
    return sorted({line.split()[0] for line in out.stdout.splitlines() if line.strip()})


@pytest.fixture(scope="module")
def two_nodes() -> list[str]:
    problem = None
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        problem = "no Slurm client commands (start the cluster: `bash cluster/slurm_harness.sh start --nodes 2`)"
    else:
        try:
            nodes = _nodes()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            nodes, problem = [], f"Slurm is not answering ({e})"
        if not problem and nodes[:2] != ["node1", "node2"]:
            problem = (f"this Slurm's nodes are {nodes}, not node1 and node2 of "
                       "`bash cluster/slurm_harness.sh start --nodes 2`")
    if problem:
        if os.environ.get("LAMAMBA_MULTINODE_REQUIRED") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    # The jobs inherit this environment (sbatch --export=ALL): share the DeepSpeed JIT cache with scripts/test.sh.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"))
    os.environ.setdefault("WANDB_MODE", "offline")
    return nodes


def _sbatch_wait(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--wait", "--parsable", *args, str(script)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_job_on_two_nodes_runs_a_task_on_each_and_the_ranks_meet_through_the_first_node(two_nodes, tmp_path):
    """`sbatch -N 2 --ntasks-per-node 1`: one task per node, each in its node's namespace (its hostname and
    address), LOCAL_RANK 0 on both, and a gloo process group whose rendezvous is the first node's address
    (MASTER_ADDR from the job's node list, as the launcher sets it on a real cluster)."""
    task = tmp_path / "task.py"
    task.write_text(textwrap.dedent("""\
        import json, os, socket, sys
        import torch
        import torch.distributed as dist

        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:29561", rank=rank,
                                world_size=world, timeout=__import__("datetime").timedelta(seconds=60))
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        peer = [None] * world
        dist.all_gather_object(peer, socket.gethostname())
        out = {"rank": rank, "host": socket.gethostname(), "addr": socket.gethostbyname(socket.gethostname()),
               "node_id": os.environ["SLURM_NODEID"], "local_rank": os.environ["SLURM_LOCALID"],
               "sum": t.item(), "peers": peer, "master": os.environ["MASTER_ADDR"]}
        with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()
    """))
    job = tmp_path / "job.sh"
    job.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
        srun --kill-on-bad-exit=1 {sys.executable} {task} {tmp_path}
    """))
    res = _sbatch_wait(job, "-N", "2", "--ntasks-per-node", "1", "--time", "3", "-o", str(tmp_path / "job.out"))
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert res.returncode == 0, f"{res.stderr}\n{log[-3000:]}"
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["host"] for r in ranks] == ["node1", "node2"], ranks
    assert [r["addr"] for r in ranks] == ["10.77.0.11", "10.77.0.12"], ranks
    assert [r["node_id"] for r in ranks] == ["0", "1"] and {r["local_rank"] for r in ranks} == {"0"}
    assert all(r["sum"] == 3.0 and r["peers"] == ["node1", "node2"] and r["master"] == "node1" for r in ranks)


@pytest.fixture(scope="module")
def two_node_reference(two_nodes, tmp_path_factory):
    """`lamamba submit --nodes 2 --tasks-per-node 1 --cpus-per-task 2` of the drill config (tests/
    test_slurm_cluster.py), uninterrupted: one rank per node, each node full."""
    from test_slurm_cluster import submit_reference

    return submit_reference(tmp_path_factory.mktemp("two_node_reference"), "--nodes", "2", "--tasks-per-node", "1",
                            "--cpus-per-task", "2")


def test_lamamba_submit_trains_on_two_nodes(two_node_reference):
    """One rank per node (LOCAL_RANK 0 on each), the rendezvous at the first node, a log per rank in the job
    folder, the run to its end on the shared run folder."""
    import json
    import re

    from test_slurm_cluster import STEPS, _diagnose, _events, _final_step_dir, _stats

    from lamamba_dist.cluster import slurm

    job_id, job_dir, run_dir = (two_node_reference[k] for k in ("job_id", "job_dir", "run_dir"))
    assert [r["State"] for r in slurm.job_history(job_id)] == ["COMPLETED"], _diagnose(job_dir)
    events = _events(job_dir)
    assert [e["event"] for e in events] == ["start", "finished"], _diagnose(job_dir)
    assert events[0]["world_size"] == 2 and events[0]["host"] == "node1" and events[0]["master"].startswith("node1:")
    where = {}
    for rank in (0, 1):
        text = (job_dir / "logs" / f"{job_id}_{rank}_log.err").read_text(errors="replace")
        m = re.search(r"rank (\d) of 2 on (\S+) \(node (\d), LOCAL_RANK (\d) of (\d)\), master (\S+)", text)
        assert m, text[-2000:]
        where[rank] = m.groups()[1:]
    assert [w[:4] for w in where.values()] == [("node1", "0", "0", "1"), ("node2", "1", "0", "1")], where
    assert where[0][4] == where[1][4] == events[0]["master"]
    final = _final_step_dir(run_dir)
    state = json.loads((final / "trainer_state.json").read_text())
    assert final.name == f"step_{STEPS:08d}" and state["world_size"] == 2 and state["step"] == STEPS
    assert (final / "rank_state" / "rank_00001.pt").is_file()
    assert [r["step"] for r in _stats(run_dir)] == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_preemption_drill_across_two_nodes_matches_the_uninterrupted_run(two_node_reference, tmp_path):
    """tests/cluster/test_slurm_cluster.py's drill (preempted twice, then its time limit; every stop saves, requeues and
    resumes) with one rank on each node: the same steps, and weights and EMA bit-identical to the reference."""
    from test_slurm_cluster import run_drill

    run_drill(two_node_reference["run_dir"], tmp_path, nodes=2, tasks_per_node=1, cpus_per_task=2)


def _harness(*args: str) -> None:
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(["bash", str(root / "cluster" / "slurm_harness.sh"), *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True, timeout=30)
    return (out.stdout.split() or ["?"])[0]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_node_failing_without_warning_costs_only_the_steps_since_the_last_checkpoint(two_node_reference, tmp_path):
    """node2 is killed mid-run (its slurmd, slurmstepd and the rank on it, SIGKILL: no signal, no save). Slurm
    declares the node down (SlurmdTimeout) and requeues the job (NODE_FAIL, `--requeue`); it starts again once
    node2 is back, resumes from the newest complete periodic checkpoint, and ends bit-identical to the
    uninterrupted run. The timeline (failure, Slurm's reaction, resume, steps lost) goes to node_failure.json."""
    import json
    import time

    from test_slurm_cluster import (STEPS, _diagnose, _event, _events, _final_step_dir, _load, _stats, _wait,
                                    _wait_job_gone, _write_config)

    from lamamba_dist.cluster import launcher, slurm
    from lamamba_dist.train.checkpoint import raw_weights

    cfg = _write_config(tmp_path)
    run_dir, job_dir = tmp_path / "run", tmp_path / "job"
    every = 10
    req = launcher.SubmitRequest(
        config=str(cfg), overrides=[f'checkpoint.dir="{run_dir}"', f"checkpoint.every={every}"], time_min=20,
        nodes=2, tasks_per_node=1, cpus_per_task=2, partition="low", job_dir=str(job_dir), max_requeues=3,
        entry="slurm_entry:run_training",
        env=[f"PYTHONPATH={Path(__file__).resolve().parents[1] / 'helpers'}", "LAMAMBA_DRILL_STEP_SLEEP=0.5"])
    job_id = launcher.submit(req).job_id
    timeline: dict = {"job_id": job_id, "checkpoint_every": every}
    try:
        start = _wait("the job to start", lambda: _event(job_dir, "start", 0), 300, job_dir)
        timeline["start"] = start["time"]

        def past_a_checkpoint():
            done = [p for p in run_dir.glob("step_*") if (p / "COMPLETE.json").is_file()]
            steps = [r["step"] for r in _stats(run_dir)]
            return bool(done) and steps and steps[-1] >= 2 * every + 5
        _wait("two periodic checkpoints and 5 more steps", past_a_checkpoint, 600, job_dir)
        _harness("node-down", "2")
        t_fail = time.time()
        failed_at = max(r["step"] for r in _stats(run_dir))
        newest = max(int(p.name.split("_")[1]) for p in run_dir.glob("step_*") if (p / "COMPLETE.json").is_file())
        timeline.update(failure=t_fail, last_step_logged=failed_at, newest_checkpoint=newest)
        # Slurm's reaction: node2 down (no slurmd answering within SlurmdTimeout), the job back in the queue
        _wait("Slurm to mark node2 down", lambda: _node_state("node2").startswith("down"), 240, job_dir, poll=1)
        timeline["node_down"] = time.time()
        _wait("the job to be requeued", lambda: slurm.queue_state(job_id) in ("PENDING", "REQUEUED", "CONFIGURING"),
              240, job_dir, poll=1)
        timeline["requeued"] = time.time()
        timeline["job_state_after_failure"] = slurm.queue_state(job_id)
        _harness("node-up", "2")
        timeline["node_up"] = time.time()
        restart = _wait("the job to start again", lambda: next(
            (e for e in _events(job_dir) if e["event"] == "start" and e["restart"] > 0), None), 300, job_dir, poll=1)
        timeline["restart"] = restart["time"]
        _wait_job_gone(job_id, job_dir, timeout=600)
        timeline["end"] = time.time()
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
        (tmp_path / "node_failure.json").write_text(json.dumps(timeline, indent=1))
        print("node failure timeline:", json.dumps(timeline))
    runs = slurm.job_history(job_id)
    timeline["sacct"] = [(r["State"], r["NodeList"]) for r in runs]
    assert runs[-1]["State"] == "COMPLETED" and len(runs) >= 2, (runs, _diagnose(job_dir))
    stats = _stats(run_dir)
    resumed_at = min(r["step"] for r in stats if r["time"] > restart["time"]) - 1
    lost = failed_at - resumed_at
    timeline.update(resumed_from=resumed_at, steps_lost=lost)
    (tmp_path / "node_failure.json").write_text(json.dumps(timeline, indent=1))
    print("node failure timeline:", json.dumps(timeline))
    # resumed from the newest checkpoint complete at the failure: only the steps since it were lost
    assert resumed_at == newest and 0 <= lost < every + 5, timeline
    final = _final_step_dir(run_dir)
    ref_final = _final_step_dir(two_node_reference["run_dir"])
    assert final.name == ref_final.name == f"step_{STEPS:08d}"
    for a, b in ((raw_weights(final), raw_weights(ref_final)),
                 (_load(final / "ema.safetensors"), _load(ref_final / "ema.safetensors"))):
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
