"""`lamamba submit` / `status` / `cancel` against a mocked Slurm (fake sinfo/sbatch/squeue/... on PATH).

No cluster needed: these run everywhere. The real-Slurm tests are in test_slurm_cluster.py.
The sbatch script is compared to a recorded golden file (tests/cluster/golden/); regenerate it after an intended change
with `UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/cluster/test_cluster_launcher.py -k golden`.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from lamamba_dist.cluster import launcher, slurm
from lamamba_dist.cluster.job import STOP_FILE, TrainJob, master_port
from lamamba_dist.cli import main as cli_main

GOLDEN = Path(__file__).parent / "golden"

# `sinfo -h -N -o "%P|%N|%c|%G|%m|%l|%a"` of a small GPU cluster (recorded format, invented names).
SINFO = """\
gpu*|gpu001|64|gpu:h100:8(S:0-1)|1031000|2-00:00:00|up
gpu*|gpu002|64|gpu:h100:8(S:0-1)|1031000|2-00:00:00|up
gpu*|gpu003|64|gpu:h100:8(S:0-1)|1031000|2-00:00:00|up
gpu*|gpu004|64|gpu:h100:8(S:0-1)|1031000|2-00:00:00|up
cpu|cpu001|32|(null)|256000|infinite|up
debug|gpu001|64|gpu:h100:8(S:0-1)|1031000|30:00|up
maint|gpu005|64|gpu:h100:8(S:0-1)|1031000|infinite|down
"""

CONFIG = """\
[model]
name = "LaMamba-debug"
resolution = 32
num_classes = 10

[train]
global_batch = 256
micro_batch = 8
steps = 100
precision = "fp32"

[checkpoint]
dir = "runs/golden"
"""


def _write_exe(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake Slurm client commands on PATH; sbatch records each call in calls.log and answers job 4242."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (tmp_path / "sinfo.txt").write_text(SINFO)
    _write_exe(bin_dir / "sinfo", f'cat {tmp_path / "sinfo.txt"}\n')
    _write_exe(bin_dir / "sbatch", f'echo "sbatch $*" >> {log}\necho "Submitted batch job 4242"\n')
    _write_exe(bin_dir / "squeue", f'echo "squeue $*" >> {log}\ncat {tmp_path / "squeue.txt"} 2>/dev/null || true\n')
    _write_exe(bin_dir / "scontrol", f'echo "scontrol $*" >> {log}\n')
    _write_exe(bin_dir / "scancel", f'echo "scancel $*" >> {log}\n')
    _write_exe(bin_dir / "sacct", f'echo "sacct $*" >> {log}\n')
    _write_exe(bin_dir / "srun", "exit 0\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "golden.toml"
    p.write_text(CONFIG)
    return p


def _gpu_request(config: Path, job_dir: Path) -> launcher.SubmitRequest:
    return launcher.SubmitRequest(
        config=str(config), time_min=240, nodes=4, gpus_per_node=8, partition="gpu", account="diffusion",
        qos="high", constraint="h100&ib", exclude="gpu009", cpus_per_task=8, mem_gb=900, max_requeues=20,
        signal_delay_s=180, job_dir=str(job_dir), env=["NCCL_SOCKET_IFNAME=ib0"], python="python3",
    )


def _normalise(script: str, job_dir: Path) -> str:
    return script.replace(str(job_dir), "<JOB_DIR>")


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to record it"
    expected = path.read_text()
    assert text == expected, f"sbatch script differs from {path}:\n--- got ---\n{text}\n--- expected ---\n{expected}"


# --------------------------------------------------------------------------- golden sbatch scripts


def test_sbatch_script_matches_golden_multinode_gpu(config, tmp_path):
    job_dir = tmp_path / "job"
    req = _gpu_request(config, job_dir)
    cfg = launcher.load_experiment(req)
    script = launcher.sbatch_script(req, cfg, job_dir)
    _check_golden("sbatch_gpu_4x8.sh", _normalise(script, job_dir))


def test_sbatch_script_matches_golden_cpu(config, tmp_path):
    job_dir = tmp_path / "job"
    req = launcher.SubmitRequest(config=str(config), time_min=30, tasks_per_node=2, partition="cpu",
                                 job_dir=str(job_dir), python="python3", overrides=["train.micro_batch=4"])
    cfg = launcher.load_experiment(req)
    _check_golden("sbatch_cpu_1x2.sh", _normalise(launcher.sbatch_script(req, cfg, job_dir), job_dir))


def test_dry_run_cli_prints_the_script_and_submits_nothing(config, tmp_path, fake_slurm, capsys):
    job_dir = tmp_path / "job"
    rc = cli_main(["submit", "--config", str(config), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--time", "240", "--account", "diffusion", "--qos", "high", "--constraint", "h100&ib",
                   "--exclude", "gpu009", "--cpus-per-task", "8", "--mem", "900", "--max-requeues", "20",
                   "--signal-delay", "180", "--job-dir", str(job_dir), "--env", "NCCL_SOCKET_IFNAME=ib0",
                   "--python", "python3", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    _check_golden("sbatch_gpu_4x8.sh", _normalise(out, job_dir))
    assert not job_dir.exists()
    assert "sbatch" not in (fake_slurm.read_text() if fake_slurm.exists() else "")


# --------------------------------------------------------------------------- validation: nothing is submitted


@pytest.mark.parametrize("args, message", [
    (["--partition", "nope"], "--partition 'nope' does not exist on this cluster; partitions: cpu, debug, gpu, maint"),
    (["--partition", "maint"], "--partition 'maint' is not up"),
    (["--gpus-per-node", "16"], "--gpus-per-node 16: partition 'gpu' has at most 8 GPU(s) per node"),
    (["--partition", "cpu", "--gpus-per-node", "1"], "partition 'cpu' has no GPUs"),
    (["--nodes", "5"], "--nodes 5: partition 'gpu' has only 4 node(s)"),
    (["--nodes", "0"], "--nodes 0: need at least 1 node"),
    (["--cpus-per-task", "16"], "8 task(s) x 16 CPU(s) = 128 CPUs per node: partition 'gpu' has at most 64"),
    (["--partition", "debug", "--time", "60"], "--time 60 min exceeds the time limit of partition 'debug' (30 min)"),
    (["--mem", "2000"], "--mem 2000.0 GB: partition 'gpu' nodes have at most"),
    (["--gpus-per-node", "3"], "global_batch = 256 is not a multiple of micro_batch (8) x world size (3)"),
    (["--time", "2", "--signal-delay", "120"], "--signal-delay 120 s is not shorter than --time 2 min"),
    (["--set", "model.name=NoSuchModel"], "[model] name = 'NoSuchModel' is not a registered model"),
    (["--set", "train.steps=-3"], "[train].steps = -3: must be >= 1"),
])
def test_bad_requests_fail_before_submitting(config, tmp_path, fake_slurm, capsys, args, message):
    job_dir = tmp_path / "job"
    opts = {"--partition": "gpu", "--gpus-per-node": "8", "--time": "60"}
    opts.update(dict(zip(args[::2], args[1::2])))
    if opts["--partition"] == "cpu" and "--gpus-per-node" not in args:
        opts["--gpus-per-node"] = "0"
    argv = ["submit", "--config", str(config), "--job-dir", str(job_dir)]
    for k, v in opts.items():
        argv += [k, v]
    rc = cli_main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert err.count("\n") == 1  # one clear line, no traceback
    assert "sbatch" not in (fake_slurm.read_text() if fake_slurm.exists() else "")
    assert not job_dir.exists()


def test_missing_config_fails_before_submitting(tmp_path, fake_slurm, capsys):
    rc = cli_main(["submit", "--config", str(tmp_path / "absent.toml"), "--time", "10", "--partition", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"config file not found: {tmp_path / 'absent.toml'}" in err
    assert not fake_slurm.exists()


def test_no_slurm_here_is_a_clear_error(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slurm, "available", lambda: False)
    rc = cli_main(["submit", "--config", str(config), "--time", "10", "--job-dir", str(tmp_path / "j")])
    assert rc == 2
    assert "not a Slurm submit host" in capsys.readouterr().err


def test_busy_job_dir_is_refused(config, tmp_path, fake_slurm, capsys):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.json").write_text(json.dumps({"job_id": "77"}))
    (tmp_path / "squeue.txt").write_text("RUNNING\n")
    rc = cli_main(["submit", "--config", str(config), "--time", "60", "--partition", "gpu", "--gpus-per-node", "8",
                   "--job-dir", str(job_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "job 77 of" in err and "is still RUNNING" in err
    assert "sbatch" not in fake_slurm.read_text()


# --------------------------------------------------------------------------- a submission (mocked sbatch)


def test_submit_writes_the_job_folder_and_pickles_the_resolved_config(config, tmp_path, fake_slurm, capsys):
    job_dir = tmp_path / "job"
    rc = cli_main(["submit", "--config", str(config), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--time", "240", "--account", "diffusion", "--qos", "high", "--constraint", "h100&ib",
                   "--exclude", "gpu009", "--cpus-per-task", "8", "--mem", "900", "--max-requeues", "20",
                   "--signal-delay", "180", "--job-dir", str(job_dir), "--env", "NCCL_SOCKET_IFNAME=ib0",
                   "--python", "python3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "submitted job 4242 to partition gpu: 32 rank(s) (4 node(s) x 8)" in out
    calls = fake_slurm.read_text().splitlines()
    assert sum(c.startswith("sbatch ") for c in calls) == 1
    rec = json.loads((job_dir / "job.json").read_text())
    assert rec["job_id"] == "4242" and rec["world_size"] == 32 and rec["max_requeues"] == 20
    assert rec["checkpoint_dir"] == str(tmp_path / "runs" / "golden")  # made absolute at submission
    # What was submitted is exactly what --dry-run prints (the golden file).
    _check_golden("sbatch_gpu_4x8.sh", _normalise((job_dir / "sbatch.sh").read_text(), job_dir))
    with open(job_dir / "logs" / "4242_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    fn = delayed.function
    assert isinstance(fn, TrainJob)
    assert fn.cfg.checkpoint.dir == str(tmp_path / "runs" / "golden")
    assert fn.cfg.model.name == "LaMamba-debug" and fn.max_requeues == 20 and fn.time_min == 240
    # Resubmitting into the same folder once the job is gone keeps the history.
    rc = cli_main(["submit", "--config", str(config), "--gpus-per-node", "8", "--partition", "gpu", "--time", "60",
                   "--job-dir", str(job_dir)])
    assert rc == 0
    assert json.loads((job_dir / "job.json").read_text())["history"] == ["4242"]


def test_cancel_save_writes_the_stop_marker_and_signals(tmp_path, fake_slurm, capsys):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "job.json").write_text(json.dumps({"job_id": "55"}))
    (tmp_path / "squeue.txt").write_text("RUNNING\n")
    assert cli_main(["cancel", str(job_dir), "--save"]) == 0
    assert (job_dir / STOP_FILE).is_file()
    assert "scancel --signal USR2 55" in fake_slurm.read_text()
    assert cli_main(["cancel", str(job_dir)]) == 0
    assert "scancel 55" in fake_slurm.read_text().splitlines()
    (tmp_path / "squeue.txt").write_text("")
    assert cli_main(["cancel", str(job_dir)]) == 0
    assert "not queued or running any more" in capsys.readouterr().out


def test_status_of_a_non_job_folder_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["status", str(tmp_path)]) == 2
    assert "no job.json here" in capsys.readouterr().err


# --------------------------------------------------------------------------- parsers and job logic


def test_parse_sinfo_aggregates_nodes_per_partition():
    parts = slurm.parse_sinfo(SINFO)
    assert sorted(parts) == ["cpu", "debug", "gpu", "maint"]
    g = parts["gpu"]
    assert g.default and g.num_nodes == 4 and g.max_gpus_per_node == 8 and g.max_cpus_per_node == 64
    assert g.time_limit_min == 2 * 1440 and parts["debug"].time_limit_min == 30
    assert parts["cpu"].max_gpus_per_node == 0 and parts["cpu"].time_limit_min is None
    assert not parts["maint"].available and not parts["cpu"].default


@pytest.mark.parametrize("gres, n", [("(null)", 0), ("gpu:8", 8), ("gpu:h100:4(S:0-1)", 4),
                                     ("gpu:a100:2,shard:8", 2), ("gpu:a:2,gpu:b:2", 4)])
def test_parse_gpus(gres, n):
    assert slurm.parse_gpus(gres) == n


@pytest.mark.parametrize("text, minutes", [("infinite", None), ("30", 30), ("30:00", 30), ("1:30:00", 90),
                                           ("2-00:00:00", 2880), ("1-12", 2160), ("0:01:30", 2)])
def test_parse_time_limit(text, minutes):
    assert slurm.parse_time_limit(text) == minutes


def test_checkpoint_requeues_until_the_limit_or_a_stop_request(tmp_path, monkeypatch):
    from lamamba_dist.train import clear_stop_request, stop_requested

    job = TrainJob(cfg=None, job_dir=str(tmp_path), max_requeues=2, time_min=10)
    try:
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        delayed = job.checkpoint()
        assert stop_requested()  # the trainer saves at its next step boundary
        assert delayed is not None and delayed.function is job
        monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
        assert job.checkpoint() is None  # limit reached
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        (tmp_path / STOP_FILE).write_text("x")
        assert job.checkpoint() is None  # lamamba cancel --save
    finally:
        clear_stop_request()


def test_master_port_changes_between_runs_of_a_job():
    ports = {master_port("123", r) for r in range(10)}
    assert len(ports) == 10 and all(20000 <= p < 60000 for p in ports)
    assert master_port("123", 3) == master_port("123", 3)


def test_dry_run_without_slurm_checks_the_config_and_prints_the_script(config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(slurm, "available", lambda: False)
    job_dir = tmp_path / "job"
    rc = cli_main(["submit", "--config", str(config), "--tasks-per-node", "2", "--partition", "cpu", "--time", "30",
                   "--set", "train.micro_batch=4", "--job-dir", str(job_dir), "--python", "python3", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0 and "partition and resources were not checked" in captured.err
    _check_golden("sbatch_cpu_1x2.sh", _normalise(captured.out, job_dir))
    rc = cli_main(["submit", "--config", str(config), "--tasks-per-node", "3", "--time", "30", "--dry-run"])
    assert rc == 2 and "world size (3)" in capsys.readouterr().err  # static checks still run


@pytest.mark.parametrize("record, reason", [
    ("JobId=5 JobState=RUNNING TimeLimit=00:10:00 RunTime=00:01:00 PreemptTime=2026-11-28T10:00:00", "preempted"),
    ("JobId=5 JobState=RUNNING TimeLimit=00:10:00 RunTime=00:08:30 PreemptTime=None", "time limit"),
    ("JobId=5 JobState=RUNNING TimeLimit=1-00:00:00 RunTime=01:00:00 PreemptTime=None", "signal"),
])
def test_stop_reason_reads_slurms_job_record(tmp_path, fake_slurm, monkeypatch, record, reason):
    (fake_slurm.parent / "fakebin" / "scontrol").write_text(f"#!/bin/bash\necho '{record}'\n")
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    job = TrainJob(cfg=None, job_dir=str(tmp_path), max_requeues=3, time_min=10, signal_delay_s=120)
    assert job.stop_reason() == reason
    (tmp_path / STOP_FILE).write_text("x")
    assert job.stop_reason() == "cancel --save"
