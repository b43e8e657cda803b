"""Small, typed wrappers around the Slurm client commands (sinfo, squeue, sacct, scontrol, scancel).

Everything here shells out; nothing imports submitit. Parsers are separate pure functions so that they can be
tested on recorded outputs without a cluster.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional


class SlurmError(RuntimeError):
    """A Slurm command failed or is missing."""


def available() -> bool:
    """True when the Slurm client commands are on PATH (this is a submit host)."""
    return all(shutil.which(c) for c in ("sbatch", "sinfo", "squeue", "scontrol"))


def run(cmd: list[str], timeout: float = 60, check: bool = True) -> str:
    """Run a Slurm command and return its stdout; raise :class:`SlurmError` naming the command on failure."""
    if shutil.which(cmd[0]) is None:
        raise SlurmError(f"{cmd[0]} not found: this machine is not a Slurm submit host")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(cmd)} did not answer within {timeout:.0f} s (is slurmctld up?)") from None
    if check and res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise SlurmError(f"{' '.join(cmd)} failed (exit {res.returncode}): {msg[-1] if msg else 'no output'}")
    return res.stdout


# --------------------------------------------------------------------------- sinfo


@dataclass
class Partition:
    """What `sinfo` says about one partition, aggregated over its nodes."""

    name: str
    available: bool = True
    default: bool = False  # the partition jobs go to without --partition
    nodes: list[str] = field(default_factory=list)
    max_cpus_per_node: int = 0
    max_gpus_per_node: int = 0
    max_mem_mb_per_node: int = 0
    time_limit_min: Optional[int] = None  # None = infinite

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)


def parse_gpus(gres: str) -> int:
    """GPU count in a sinfo gres string: ``gpu:8``, ``gpu:h100:8(S:0-1)``, ``gpu:a100:4,shard:8``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        item = re.sub(r"\(.*?\)", "", item).strip()
        parts = item.split(":")
        if parts[0] != "gpu" or len(parts) < 2:
            continue
        try:
            total += int(parts[-1])
        except ValueError:  # "gpu:h100" without a count means 1 in Slurm's syntax
            total += 1
    return total


def parse_time_limit(text: str) -> Optional[int]:
    """Minutes in a Slurm time limit (``infinite``, ``30``, ``1:30:00``, ``2-00:00:00``, ``45:00``); None = no limit."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "NONE", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts[:3]
    elif len(parts) == 3:
        h, m, s = parts
    elif len(parts) == 2:  # minutes:seconds
        h, m, s = 0, parts[0], parts[1]
    else:  # minutes
        h, m, s = 0, parts[0], 0
    return days * 1440 + h * 60 + m + (1 if s else 0)


SINFO_FORMAT = "%P|%N|%c|%G|%m|%l|%a"  # %P marks the default partition with "*"


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Parse ``sinfo -h -N -o SINFO_FORMAT`` (one line per node and partition)."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 7:
            raise SlurmError(f"unexpected sinfo line: {line!r}")
        name, node, cpus, gres, mem, limit, avail = (f.strip() for f in fields)
        p = parts.setdefault(name.rstrip("*"), Partition(name=name.rstrip("*")))
        p.default = p.default or name.endswith("*")
        if node not in p.nodes:
            p.nodes.append(node)
        p.max_cpus_per_node = max(p.max_cpus_per_node, int(re.sub(r"\D.*", "", cpus) or 0))
        p.max_gpus_per_node = max(p.max_gpus_per_node, parse_gpus(gres))
        p.max_mem_mb_per_node = max(p.max_mem_mb_per_node, int(re.sub(r"\D.*", "", mem) or 0))
        p.time_limit_min = parse_time_limit(limit)
        p.available = avail.strip() == "up"
    return parts


def partitions() -> dict[str, Partition]:
    return parse_sinfo(run(["sinfo", "-h", "-N", "-o", SINFO_FORMAT]))


# --------------------------------------------------------------------------- jobs


def parse_scontrol_record(text: str) -> dict[str, str]:
    """``scontrol show job -o`` -> {key: value} (values never contain spaces in the fields we read)."""
    out: dict[str, str] = {}
    for tok in text.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out.setdefault(k, v)
    return out


def show_job(job_id: str) -> Optional[dict[str, str]]:
    """slurmctld's record of a job (None once it has been purged, MinJobAge after it ended)."""
    out = run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if not out.strip() or "Invalid job id" in out:
        return None
    return parse_scontrol_record(out.splitlines()[0])


SACCT_FIELDS = ("JobID", "JobName", "Partition", "State", "Start", "End", "Elapsed", "NodeList", "ExitCode")


def parse_sacct(text: str) -> list[dict[str, str]]:
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        vals = line.split("|")
        rows.append(dict(zip(SACCT_FIELDS, vals)))
    return rows


def job_history(job_id: str) -> list[dict[str, str]]:
    """Every run of a job (one row per requeue) from accounting, oldest first; [] if sacct is unavailable."""
    try:
        out = run(["sacct", "-j", str(job_id), "--duplicates", "-X", "-P", "-n", "-o", ",".join(SACCT_FIELDS)])
    except SlurmError:
        return []
    return parse_sacct(out)


def queue_state(job_id: str) -> Optional[str]:
    """PENDING / RUNNING / ... while the job is in the queue, else None."""
    out = run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[0] if lines else None


def requeue(job_id: str) -> None:
    run(["scontrol", "requeue", str(job_id)])


def cancel(job_id: str, signal: Optional[str] = None) -> None:
    cmd = ["scancel"]
    if signal:
        cmd += ["--signal", signal]
    run(cmd + [str(job_id)])
