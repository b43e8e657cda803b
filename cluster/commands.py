"""`lamamba submit`, `lamamba status`, `lamamba cancel`: thin CLI over :mod:`lamamba_dist.cluster.launcher`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub, name: str, help_text: str):
    return {"submit": _add_submit, "status": _add_status, "cancel": _add_cancel}[name](sub, name, help_text)


# --------------------------------------------------------------------------- submit


def _add_submit(sub, name: str, help_text: str):
    p = sub.add_parser(
        name, help=help_text,
        description="Submit one Slurm job (through submitit) that trains --config on NODES x GPUS ranks, one task per "
                    "GPU. On preemption or at the time limit every rank saves at the next step boundary and the job "
                    "requeues itself and resumes, up to --max-requeues times. Partition, resources and the config "
                    "are checked against `sinfo` before anything is queued. Rerunning the same command after the job "
                    "ended continues from the newest checkpoint.",
    )
    p.add_argument("--config", required=True, help="experiment TOML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (TOML syntax), e.g. --set train.steps=1000; repeatable")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, metavar="G",
                   help="GPUs per node = tasks (ranks) per node; 0 = CPU job (default 0)")
    p.add_argument("--tasks-per-node", type=int, default=None, metavar="T",
                   help="ranks per node for CPU jobs (default: G, or 1 without GPUs)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    p.add_argument("--time", dest="time_min", type=int, required=True, metavar="MIN",
                   help="time limit of each run of the job, in minutes (the job requeues itself when it is hit)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None, help="node features, e.g. 'h100&ib'")
    p.add_argument("--exclude", default=None, help="nodes to avoid, e.g. 'node[01-03]'")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (data loader workers + 1)")
    p.add_argument("--mem", dest="mem_gb", type=float, default=None, metavar="GB", help="memory per node in GB")
    p.add_argument("--max-requeues", type=int, default=100, metavar="K",
                   help="at most K requeues (preemptions + time limits) of this job; then it saves and ends (default 100)")
    p.add_argument("--signal-delay", dest="signal_delay_s", type=int, default=120, metavar="S",
                   help="Slurm signals the job S seconds before its time limit so that it can save (default 120)")
    p.add_argument("--job-dir", default=None, metavar="DIR",
                   help="job folder: logs, events, batch script (default: <[checkpoint] dir>/slurm)")
    p.add_argument("--job-name", default=None, help="Slurm job name (default: lamamba-<config name>)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export this variable in the job (e.g. NCCL_SOCKET_IFNAME=ib0); repeatable")
    p.add_argument("--python", default=None, metavar="CMD",
                   help="command that starts python on the nodes (default: this interpreter)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the batch script, submit nothing")
    p.set_defaults(func=run_submit)
    return p


def _request(args):
    from lamamba_dist.cluster.launcher import SubmitRequest

    return SubmitRequest(
        config=args.config, time_min=args.time_min, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node, partition=args.partition, account=args.account, qos=args.qos,
        constraint=args.constraint, exclude=args.exclude, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        max_requeues=args.max_requeues, signal_delay_s=args.signal_delay_s, job_dir=args.job_dir,
        job_name=args.job_name, overrides=list(args.overrides), env=list(args.env), python=args.python,
    )


def run_submit(args) -> int:
    from lamamba_dist.cluster import launcher, slurm
    from lamamba_dist.errors import CLIError

    req = _request(args)
    try:
        if args.dry_run:
            on_cluster = slurm.available()
            cfg, job_dir, partition = launcher.prepare(req, check_cluster=on_cluster)
            if not on_cluster:
                print("note: no Slurm here (sinfo not found): partition and resources were not checked",
                      file=sys.stderr)
            print(launcher.sbatch_script(req, cfg, job_dir), end="")
            return 0
        sub = launcher.submit(req, argv=sys.argv[1:])
    except launcher.SubmitError as e:
        raise CLIError(str(e)) from None
    except slurm.SlurmError as e:
        raise CLIError(str(e)) from None
    print(f"submitted job {sub.job_id} to partition {sub.partition or '(default)'}: {req.world_size} rank(s) "
          f"({req.nodes} node(s) x {req.ntasks_per_node}); job folder {sub.job_dir}")
    print(f"  lamamba status {sub.job_dir}    lamamba cancel {sub.job_dir}")
    return 0


# --------------------------------------------------------------------------- status


def _add_status(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text,
                       description="State of the job of a job folder: Slurm state, every run (requeues), the "
                                   "job's own events (preemptions, time limits, saves), logs and checkpoints.")
    p.add_argument("job_dir", metavar="JOB_DIR", help="the job folder (`lamamba submit --job-dir`)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run_status)
    return p


def job_status(job_dir: Path) -> dict:
    """Everything `lamamba status` shows, as a dict."""
    from lamamba_dist.cluster import launcher, slurm
    from lamamba_dist.cluster.job import EVENTS_FILE

    rec = launcher.read_job_record(job_dir)
    if rec is None:
        raise launcher.SubmitError(f"{job_dir}: no job.json here (not a job folder of `lamamba submit`)")
    job_id = rec["job_id"]
    out = {"job_id": job_id, "job_dir": str(job_dir), "checkpoint_dir": rec.get("checkpoint_dir"),
           "partition": rec.get("partition"), "world_size": rec.get("world_size"), "state": None, "restarts": None,
           "runs": [], "events": [], "checkpoints": []}
    if slurm.available():
        try:
            out["state"] = slurm.queue_state(job_id)
            info = slurm.show_job(job_id)
            if info:
                out["state"] = out["state"] or info.get("JobState")
                out["restarts"] = int(info.get("Restarts", "0") or 0)
            out["runs"] = slurm.job_history(job_id)
            if not out["state"] and out["runs"]:
                out["state"] = out["runs"][-1].get("State")
        except slurm.SlurmError as e:
            out["slurm_error"] = str(e)
    ev = Path(job_dir) / EVENTS_FILE
    if ev.is_file():
        for line in ev.read_text().splitlines():
            try:
                out["events"].append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if out["restarts"] is None and out["runs"]:
        out["restarts"] = len(out["runs"]) - 1
    ck = Path(rec.get("checkpoint_dir") or "")
    if ck.is_dir():
        out["checkpoints"] = sorted(p.name for p in ck.iterdir() if p.is_dir() and p.name.startswith("step_")
                                    and (p / "COMPLETE.json").is_file())
    logs = Path(rec.get("logs") or Path(job_dir) / "logs")
    out["logs"] = sorted(str(p) for p in logs.glob(f"{job_id}_*_log.*")) if logs.is_dir() else []
    return out


def run_status(args) -> int:
    from lamamba_dist.cluster import launcher
    from lamamba_dist.errors import CLIError

    try:
        st = job_status(Path(args.job_dir).absolute())
    except launcher.SubmitError as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    print(f"job {st['job_id']}  state {st['state'] or 'unknown (not in squeue/sacct)'}  restarts {st['restarts'] if st['restarts'] is not None else '?'}"
          f"  partition {st['partition']}  ranks {st['world_size']}")
    if st.get("slurm_error"):
        print(f"  (slurm: {st['slurm_error']})")
    for i, r in enumerate(st["runs"]):
        print(f"  run {i}: {r.get('State', '?'):<12} {r.get('Start', '?')} -> {r.get('End', '?')} "
              f"({r.get('Elapsed', '?')}) on {r.get('NodeList', '?')}")
    mine = [e for e in st["events"] if str(e.get("job_id")) == str(st["job_id"])]
    if len(mine) < len(st["events"]):
        print(f"  ({len(st['events']) - len(mine)} event(s) of earlier jobs of this folder in events.jsonl)")
    for e in mine[-8:]:
        extra = {k: v for k, v in e.items() if k not in ("time", "event", "job_id", "host")}
        print(f"  event {e.get('event')}: {json.dumps(extra, sort_keys=True)}")
    print(f"  checkpoints in {st['checkpoint_dir']}: {', '.join(st['checkpoints'][-3:]) or 'none yet'}")
    print(f"  logs: {st['logs'][0].rsplit('_', 2)[0] + '_<rank>_log.{out,err}' if st['logs'] else 'none yet'}")
    return 0


# --------------------------------------------------------------------------- cancel


def _add_cancel(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text,
                       description="Cancel the job of a job folder. With --save the job first saves a checkpoint "
                                   "at the next step boundary and ends without requeueing (resume later by "
                                   "rerunning `lamamba submit`); without it, progress since the last checkpoint "
                                   "is lost.")
    p.add_argument("job_dir", metavar="JOB_DIR")
    p.add_argument("--save", action="store_true", help="save a checkpoint first (sends SIGUSR2; no requeue)")
    p.set_defaults(func=run_cancel)
    return p


def run_cancel(args) -> int:
    from lamamba_dist.cluster import launcher, slurm
    from lamamba_dist.cluster.job import STOP_FILE
    from lamamba_dist.errors import CLIError

    job_dir = Path(args.job_dir).absolute()
    try:
        rec = launcher.read_job_record(job_dir)
    except launcher.SubmitError as e:
        raise CLIError(str(e)) from None
    if rec is None:
        raise CLIError(f"{job_dir}: no job.json here (not a job folder of `lamamba submit`)")
    job_id = rec["job_id"]
    try:
        state = slurm.queue_state(job_id)
        if state is None:
            print(f"job {job_id} is not queued or running any more; nothing to cancel")
            return 0
        if args.save and state == "RUNNING":
            (job_dir / STOP_FILE).write_text(f"lamamba cancel --save of job {job_id}\n")
            slurm.cancel(job_id, signal="USR2")
            print(f"job {job_id}: asked every rank to save and stop (no requeue); `lamamba status {job_dir}`")
        else:
            slurm.cancel(job_id)
            print(f"job {job_id} ({state}) cancelled")
    except slurm.SlurmError as e:
        raise CLIError(str(e)) from None
    return 0
