"""`lamamba submit`: one Slurm job through submitit, one task per GPU, validated before anything is queued.

A job folder (``--job-dir``, default ``<[checkpoint] dir>/slurm``) holds everything about the job::

    JOB_DIR/
      job.json          job id, resources, command line, config path, earlier job ids of this folder
      config.json       the resolved experiment config the job was submitted with
      sbatch.sh         the batch script as submitted (also what --dry-run prints)
      events.jsonl      rank 0's events: start / stop (preempted, time limit) / requeue / finished / failed
      logs/             submitit's folder: <jobid>_<rank>_log.out|err per rank (appended across requeues),
                        <jobid>_submitted.pkl (the pickled TrainJob), <jobid>_<rank>_result.pkl

Checkpoints go to ``[checkpoint] dir`` (made absolute at submission), never into the job folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lamamba_dist.cluster import slurm
from lamamba_dist.cluster.job import DEFAULT_ENTRY

SUBMITIT_COMMAND = "-u -m submitit.core._submit"


class SubmitError(ValueError):
    """The request cannot be submitted (bad config, partition or resources); nothing was queued."""


@dataclass
class SubmitRequest:
    config: str
    time_min: int
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 without GPUs
    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    max_requeues: int = 100
    signal_delay_s: int = 120
    job_dir: Optional[str] = None
    job_name: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # extra KEY=VALUE exported in the batch script
    python: Optional[str] = None  # how the job starts python; default: this interpreter
    entry: str = DEFAULT_ENTRY  # training function (tests may point it elsewhere)

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


# --------------------------------------------------------------------------- config and folders


def load_experiment(req: SubmitRequest):
    """The experiment config with ``[checkpoint] dir`` made absolute (the job may start in another directory)."""
    from lamamba_dist.config import ConfigError, load_config

    try:
        cfg = load_config(req.config, req.overrides)
    except ConfigError as e:
        raise SubmitError(str(e)) from None
    cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir).expanduser().absolute())
    return cfg


def job_dir_for(req: SubmitRequest, cfg) -> Path:
    d = Path(req.job_dir).expanduser() if req.job_dir else Path(cfg.checkpoint.dir) / "slurm"
    return d.absolute()


def python_command(req: SubmitRequest) -> str:
    return req.python or shlex.quote(sys.executable)


# --------------------------------------------------------------------------- validation


def validate_request(req: SubmitRequest, cfg, partitions: Optional[dict[str, slurm.Partition]]) -> Optional[str]:
    """Raise :class:`SubmitError` for anything Slurm or the trainer would reject later; return the partition.

    ``partitions`` is what ``sinfo`` reports (None when no Slurm is reachable: only the static checks run).
    """
    if req.nodes < 1:
        raise SubmitError(f"--nodes {req.nodes}: need at least 1 node")
    if req.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node {req.gpus_per_node}: must be >= 0")
    if req.tasks_per_node is not None and req.tasks_per_node < 1:
        raise SubmitError(f"--tasks-per-node {req.tasks_per_node}: must be >= 1")
    if req.gpus_per_node > 0 and req.tasks_per_node not in (None, req.gpus_per_node):
        raise SubmitError(f"--tasks-per-node {req.tasks_per_node} with --gpus-per-node {req.gpus_per_node}: "
                          "the launcher runs exactly one task per GPU; drop --tasks-per-node")
    if req.time_min < 1:
        raise SubmitError(f"--time {req.time_min}: must be at least 1 minute")
    if req.signal_delay_s < 10:
        raise SubmitError(f"--signal-delay {req.signal_delay_s}: need at least 10 s to save a checkpoint")
    if req.signal_delay_s >= req.time_min * 60:
        raise SubmitError(f"--signal-delay {req.signal_delay_s} s is not shorter than --time {req.time_min} min: "
                          "the job would be told to save as soon as it starts")
    if req.max_requeues < 0:
        raise SubmitError(f"--max-requeues {req.max_requeues}: must be >= 0")
    if req.cpus_per_task is not None and req.cpus_per_task < 1:
        raise SubmitError(f"--cpus-per-task {req.cpus_per_task}: must be >= 1")
    if req.mem_gb is not None and req.mem_gb <= 0:
        raise SubmitError(f"--mem {req.mem_gb}: must be > 0 (GB per node)")
    for kv in req.env:
        if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
            raise SubmitError(f"--env {kv!r}: expected NAME=VALUE")

    name = _validate_partition(req, partitions) if partitions is not None else req.partition
    # The batch layout must fit the world size, or the trainer fails after waiting in the queue.
    from lamamba_dist.train.ds_config import gradient_accumulation_steps

    try:
        gradient_accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, req.world_size)
    except ValueError as e:
        raise SubmitError(f"{cfg.source}: {e} ({req.nodes} node(s) x {req.ntasks_per_node} task(s))") from None
    try:
        from lamamba_dist.models import list_models

        names = list(list_models())
    except Exception:  # the model registry is not importable here: the job will say so
        names = []
    if names and cfg.model.name not in names:
        raise SubmitError(f"{cfg.source}: [model] name = {cfg.model.name!r} is not a registered model; "
                          f"choose from: {', '.join(names)}")

    return name


def _validate_partition(req: SubmitRequest, partitions: dict[str, slurm.Partition]) -> str:
    if not partitions:
        raise SubmitError("sinfo lists no partitions: is slurmctld up?")
    name = req.partition
    if name is None:
        defaults = [p.name for p in partitions.values() if p.default]
        if not defaults:
            raise SubmitError(f"no --partition given and the cluster has no default partition; "
                              f"choose from: {', '.join(sorted(partitions))}")
        name = defaults[0]
    if name not in partitions:
        raise SubmitError(f"--partition {name!r} does not exist on this cluster; "
                          f"partitions: {', '.join(sorted(partitions))}")
    p = partitions[name]
    if not p.available:
        raise SubmitError(f"--partition {name!r} is not up (sinfo availability: down/inactive)")
    if req.nodes > p.num_nodes:
        raise SubmitError(f"--nodes {req.nodes}: partition {name!r} has only {p.num_nodes} node(s)")
    if req.gpus_per_node > p.max_gpus_per_node:
        have = f"at most {p.max_gpus_per_node} GPU(s) per node" if p.max_gpus_per_node else "no GPUs"
        raise SubmitError(f"--gpus-per-node {req.gpus_per_node}: partition {name!r} has {have}"
                          + ("" if p.max_gpus_per_node else "; use --gpus-per-node 0 --tasks-per-node N on CPUs"))
    cpus = req.ntasks_per_node * (req.cpus_per_task or 1)
    if p.max_cpus_per_node and cpus > p.max_cpus_per_node:
        raise SubmitError(f"{req.ntasks_per_node} task(s) x {req.cpus_per_task or 1} CPU(s) = {cpus} CPUs per node: "
                          f"partition {name!r} has at most {p.max_cpus_per_node} CPUs per node")
    if req.mem_gb is not None and p.max_mem_mb_per_node and req.mem_gb * 1024 > p.max_mem_mb_per_node:
        raise SubmitError(f"--mem {req.mem_gb} GB: partition {name!r} nodes have at most "
                          f"{p.max_mem_mb_per_node / 1024:.1f} GB")
    if p.time_limit_min is not None and req.time_min > p.time_limit_min:
        raise SubmitError(f"--time {req.time_min} min exceeds the time limit of partition {name!r} ({p.time_limit_min} min)")
    return name


# --------------------------------------------------------------------------- the batch script


def executor_parameters(req: SubmitRequest, cfg, job_dir: Path) -> dict[str, Any]:
    """Parameters for ``submitit.SlurmExecutor.update_parameters`` (the names of submitit's sbatch builder)."""
    setup = [
        f"export LAMAMBA_JOB_DIR={shlex.quote(str(job_dir))}",
        "export PYTHONUNBUFFERED=1",
        # NVLink SHARP multicast (NVLS) off: it fails to allocate or hangs on some fabrics/containers.
        "export NCCL_NVLS_ENABLE=0",
        # A failed or hung collective aborts every rank instead of hanging until the time limit.
        "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        f"export OMP_NUM_THREADS={req.cpus_per_task or 1}",
    ]
    if req.gpus_per_node == 0:
        setup.append("export DS_ACCELERATOR=cpu")
    setup += [f"export {kv.split('=', 1)[0]}={shlex.quote(kv.split('=', 1)[1])}" for kv in req.env]
    params: dict[str, Any] = {
        "job_name": req.job_name or f"lamamba-{Path(req.config).stem}",
        "time": req.time_min,
        "nodes": req.nodes,
        "ntasks_per_node": req.ntasks_per_node,
        "signal_delay_s": req.signal_delay_s,
        "setup": setup,
        # --requeue: Slurm may requeue the job (preemption, node failure); --kill-on-bad-exit: one rank
        # failing ends the step instead of leaving the others blocked in a collective.
        "additional_parameters": {"requeue": True},
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    if req.partition:
        params["partition"] = req.partition
    if req.gpus_per_node > 0:
        params["gpus_per_node"] = req.gpus_per_node
    for key in ("cpus_per_task", "account", "qos", "constraint", "exclude"):
        value = getattr(req, key)
        if value is not None:
            params[key] = value
    if req.mem_gb is not None:
        params["mem"] = f"{int(req.mem_gb)}GB" if req.mem_gb == int(req.mem_gb) else f"{int(req.mem_gb * 1024)}MB"
    return params


def sbatch_script(req: SubmitRequest, cfg, job_dir: Path) -> str:
    """Exactly the script submitit submits for this request (same builder, same parameters)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = job_dir / "logs"
    command = " ".join([python_command(req), SUBMITIT_COMMAND, shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **executor_parameters(req, cfg, job_dir))


# --------------------------------------------------------------------------- job folder


def read_job_record(job_dir: Path) -> Optional[dict]:
    path = Path(job_dir) / "job.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SubmitError(f"{path}: not valid JSON ({e})") from None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def check_job_dir_free(job_dir: Path) -> Optional[dict]:
    """Refuse a folder whose previous job is still queued or running (two jobs would train into one run)."""
    rec = read_job_record(job_dir)
    if rec and rec.get("job_id") and slurm.available():
        state = slurm.queue_state(rec["job_id"])
        if state:
            raise SubmitError(f"job {rec['job_id']} of {job_dir} is still {state}; `lamamba cancel {job_dir}` first "
                              "or pass another --job-dir")
    return rec


# --------------------------------------------------------------------------- submit


@dataclass
class Submission:
    job_id: Optional[str]
    job_dir: Path
    script: str
    partition: Optional[str]


def prepare(req: SubmitRequest, check_cluster: bool = True):
    """Load and validate everything; returns (cfg, job_dir, partition). Nothing is written or queued."""
    if not Path(req.config).is_file():
        raise SubmitError(f"config file not found: {req.config}")
    cfg = load_experiment(req)
    parts = None
    if check_cluster:
        if not slurm.available():
            raise SubmitError("sbatch/sinfo not found: this machine is not a Slurm submit host "
                              "(--dry-run prints the batch script anywhere)")
        try:
            parts = slurm.partitions()
        except slurm.SlurmError as e:
            raise SubmitError(str(e)) from None
    partition = validate_request(req, cfg, parts)
    return cfg, job_dir_for(req, cfg), partition


def submit(req: SubmitRequest, argv: Optional[list[str]] = None) -> Submission:
    """Validate, write the job folder, submit one job; returns its id. Raises SubmitError before queueing."""
    import submitit

    from lamamba_dist.cluster.job import STOP_FILE, TrainJob
    from lamamba_dist.config import to_dict

    cfg, job_dir, partition = prepare(req, check_cluster=True)
    previous = check_job_dir_free(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / STOP_FILE).unlink(missing_ok=True)
    _write_json(job_dir / "config.json", {"source": cfg.source, **to_dict(cfg)})

    executor = submitit.SlurmExecutor(folder=job_dir / "logs", max_num_timeout=req.max_requeues,
                                      python=python_command(req))
    executor.update_parameters(**executor_parameters(req, cfg, job_dir))
    fn = TrainJob(cfg, str(job_dir), max_requeues=req.max_requeues, time_min=req.time_min,
                  signal_delay_s=req.signal_delay_s, entry=req.entry)
    try:
        job = executor.submit(fn)
    except Exception as e:  # sbatch refused (e.g. account/qos): nothing is queued
        raise SubmitError(f"sbatch refused the job: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    script = job.paths.submission_file.read_text() if job.paths.submission_file.is_file() else ""
    (job_dir / "sbatch.sh").write_text(script)
    history = list((previous or {}).get("history", []))
    if previous and previous.get("job_id"):
        history.append(previous["job_id"])
    record = {
        "job_id": job.job_id,
        "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else None,
        "cwd": os.getcwd(),
        "config": str(Path(req.config).absolute()),
        "checkpoint_dir": cfg.checkpoint.dir,
        "partition": partition,
        "nodes": req.nodes,
        "tasks_per_node": req.ntasks_per_node,
        "gpus_per_node": req.gpus_per_node,
        "world_size": req.world_size,
        "time_min": req.time_min,
        "max_requeues": req.max_requeues,
        "signal_delay_s": req.signal_delay_s,
        "logs": str(job_dir / "logs"),
        "history": history,
        "request": dataclasses.asdict(req),
    }
    _write_json(job_dir / "job.json", record)
    return Submission(job.job_id, job_dir, script, partition)
