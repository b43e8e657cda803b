"""``lamamba report RUN_DIR``: one self-contained HTML page (and PNGs beside it) of a run, finished or live.

Read from the run folder (``[checkpoint] dir``):

- ``stats.jsonl`` (lamamba_dist/train/monitor.py): one record per log interval (loss, grad norm, lr, img/s,
  MFU, peak memory, data-wait share, the checkpoint's blocked and write time), and event records: ``resume``,
  ``nonfinite``, ``checkpoint`` (lamamba_dist/train/checkpointing.py); a ``fid`` value where one was computed;
- ``samples/*.png``: the newest sample grids;
- the Slurm job folder's ``events.jsonl`` (cluster/job.py: start, stop, requeue, finished, failed), found at
  ``RUN_DIR/slurm`` (where ``lamamba submit`` puts it by default) or given with ``--job-dir``.

Written: ``report.html`` (every figure embedded as a data URI: the page works offline and can be mailed),
``loss.png``, ``grad_norm.png``, ``throughput.png``, ``memory.png``, ``lr.png``, ``timeline.png`` and, when the
run has FID values, ``fid.png``, and ``report.json`` (the summary numbers and the series drawn). A line of
``stats.jsonl`` that is still being written (a live run) is skipped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

EVENT_KINDS = ("resume", "nonfinite", "checkpoint", "samples", "fid")


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and how many lines were skipped (unparsable: a live writer's last line)."""
    recs, bad = [], 0
    if not path.is_file():
        return recs, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs, bad


def load_run(run_dir: Path, job_dir: Optional[Path] = None) -> dict[str, Any]:
    """Everything the report shows, as plain data (what ``report.json`` holds)."""
    run_dir = Path(run_dir)
    recs, skipped = read_jsonl(run_dir / "stats.jsonl")
    logs = [r for r in recs if "event" not in r and "step" in r]
    events = [r for r in recs if r.get("event") in EVENT_KINDS]
    jd = Path(job_dir) if job_dir else run_dir / "slurm"
    slurm, _ = read_jsonl(jd / "events.jsonl")
    samples = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []

    def series(key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in logs
                if r.get(key) is not None and isinstance(r[key], (int, float)) and math.isfinite(r[key])]

    keys = ("loss", "grad_norm", "lr", "img_per_s", "mfu", "peak_mem_gib", "data_wait", "fid")
    data = {k: series(k) for k in keys}
    data["fid"] = [(int(e["step"]), float(e["fid"])) for e in events  # in-loop FID: event records (train/watch.py)
                   if e["event"] == "fid" and isinstance(e.get("fid"), (int, float))]
    kimg = [(int(r["step"]), r["images_seen"] / 1000) for r in logs if r.get("images_seen") is not None]
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    speeds = [v for _, v in data["img_per_s"]]
    summary = {
        "run_dir": str(run_dir), "records": len(logs), "skipped_lines": skipped,
        "last_step": logs[-1]["step"] if logs else None,
        "kimg": round(logs[-1]["images_seen"] / 1000, 3) if logs and logs[-1].get("images_seen") is not None else None,
        "last_loss": data["loss"][-1][1] if data["loss"] else None,
        "median_img_per_s": sorted(speeds)[len(speeds) // 2] if speeds else None,
        "peak_mem_gib": max((v for _, v in data["peak_mem_gib"]), default=None),
        "checkpoints": len(ckpts),
        "checkpoint_blocked_s": round(sum(c.get("blocked_s", 0) + c.get("wait_s", 0) for c in ckpts), 3),
        "resumes": sum(e["event"] == "resume" for e in events),
        "nonfinite_steps": sum(e["event"] == "nonfinite" for e in events),
        "slurm_events": len(slurm), "sample_grids": [str(p) for p in samples[-4:]],
        "last_fid": data["fid"][-1][1] if data["fid"] else None,
    }
    timeline = [(float(r["time"]), float(r["step"]), "log") for r in logs if r.get("time") is not None]
    timeline += [(float(e["time"]), float(e.get("step") or 0), e["event"]) for e in events if e.get("time") is not None]
    at = sorted((t, st) for t, st, _ in timeline)
    for e in slurm:  # a Slurm event sits at the last step logged before it
        if e.get("time") is not None:
            before = [st for t, st in at if t <= e["time"]]
            timeline.append((float(e["time"]), before[-1] if before else 0.0, "slurm"))
    return {"summary": summary, "series": data, "kimg": kimg, "events": events, "slurm_events": slurm,
            "timeline": sorted(timeline)}


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (debiased, as TensorBoard's smoothing)."""
    out, m = [], 0.0
    for i, v in enumerate(values):
        m = (1 - alpha) * m + alpha * v
        out.append(m / (1 - (1 - alpha) ** (i + 1)))
    return out


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=100)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _kimg_axis(ax, kimg: list[tuple[int, float]]) -> None:
    """A top axis in thousands of images, from the logged (step, images seen) pairs."""
    if len(kimg) < 2:
        return
    import numpy as np

    st = np.array([s for s, _ in kimg], dtype=float)
    ki = np.array([k for _, k in kimg], dtype=float)
    if np.any(np.diff(st) <= 0) or np.any(np.diff(ki) < 0):  # a resume repeats steps: keep the last of each
        last = {}
        for s, k in kimg:
            last[s] = k
        st = np.array(sorted(last), dtype=float)
        ki = np.array([last[s] for s in sorted(last)], dtype=float)
    if len(st) < 2 or np.any(np.diff(ki) <= 0):
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, st, ki), lambda k: np.interp(k, ki, st)))
    top.set_xlabel("kimg", fontsize=8)
    top.tick_params(labelsize=7)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw(run: dict, out: Path) -> dict[str, Path]:
    """Write the figures into ``out``; returns name -> path (only the figures the run has data for)."""
    s, kimg = run["series"], run["kimg"]
    figs: dict[str, Path] = {}

    def line(name: str, title: str, parts: list[tuple[str, str, float]], ylabel: str, log: bool = False):
        if not any(s[k] for k, _, _ in parts):
            return
        plt, fig, ax = _figure(title)
        for key, label, scale in parts:
            if s[key]:
                xs, ys = zip(*s[key])
                ax.plot(xs, [y * scale for y in ys], lw=1, label=label)
        if log and all(y > 0 for k, _, _ in parts for _, y in s[k]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if len(parts) > 1:
            ax.legend(fontsize=8)
        _kimg_axis(ax, kimg)
        figs[name] = _save(plt, fig, out / f"{name}.png")

    if s["loss"]:
        plt, fig, ax = _figure("training loss (per log interval, and its moving average)")
        xs, ys = zip(*s["loss"])
        a = min(0.5, max(0.02, 10 / len(ys)))  # about 10 log points of memory: short runs are not all lag
        ax.plot(xs, ys, lw=0.8, alpha=0.35, label="loss")
        ax.plot(xs, smooth(list(ys), a), lw=1.6, label=f"smoothed (EMA {a:.2g})")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        _kimg_axis(ax, kimg)
        figs["loss"] = _save(plt, fig, out / "loss.png")
    line("grad_norm", "gradient norm (global, before clipping)", [("grad_norm", "grad norm", 1.0)], "L2 norm", log=True)
    if s["img_per_s"]:
        plt, fig, ax = _figure("throughput" + (" and model FLOPs utilisation" if s["mfu"] else ""))
        xs, ys = zip(*s["img_per_s"])
        ax.plot(xs, ys, lw=1, color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel("images / s", color="C0")
        if s["mfu"]:
            ax2 = ax.twinx()
            mx, my = zip(*s["mfu"])
            ax2.plot(mx, [100 * v for v in my], lw=1, color="C1")
            ax2.set_ylabel("MFU %", color="C1")
        _kimg_axis(ax, kimg)
        figs["throughput"] = _save(plt, fig, out / "throughput.png")
    line("memory", "peak memory and data wait", [("peak_mem_gib", "peak memory (GiB)", 1.0),
                                                 ("data_wait", "data wait (% of step time)", 100.0)], "GiB / %")
    line("lr", "learning rate", [("lr", "lr", 1.0)], "lr")
    if s["fid"]:
        plt, fig, ax = _figure("FID over training (in-loop, fewer samples than the paper's 50k: not comparable)")
        kk = dict(kimg)
        xs = [kk.get(st, st) for st, _ in s["fid"]]
        ax.plot(xs, [v for _, v in s["fid"]], marker="o", lw=1)
        ax.set_xlabel("kimg" if kk else "step")
        ax.set_ylabel("FID")
        figs["fid"] = _save(plt, fig, out / "fid.png")
    timeline = run.get("timeline", [])  # (wall time, step, kind): kind "log", an event, or "slurm"
    if timeline:
        plt, fig, ax = _figure("timeline: steps over wall time, with checkpoints, resumes and Slurm events")
        t0 = min(t for t, _, _ in timeline)
        logs = [(t - t0, st) for t, st, kind in timeline if kind == "log"]
        if logs:
            ax.plot([t / 60 for t, _ in logs], [st for _, st in logs], lw=1, color="0.4", label="step")
        style = {"checkpoint": ("C2", "s"), "resume": ("C0", "^"), "nonfinite": ("C3", "x"), "slurm": ("C1", "v"),
                 "samples": ("C4", "o"), "fid": ("C5", "D")}
        for kind, (color, marker) in style.items():
            pts = [((t - t0) / 60, st) for t, st, k in timeline if k == kind]
            if pts:
                ax.scatter(*zip(*pts), color=color, marker=marker, s=28, label=kind, zorder=3)
        ax.set_xlabel("minutes since the first logged step")
        ax.set_ylabel("step")
        ax.legend(fontsize=8)
        figs["timeline"] = _save(plt, fig, out / "timeline.png")
    return figs


def _rows(run: dict) -> list[tuple[float, str, str]]:
    """The timeline table: (time, what, details), oldest first."""
    rows = []
    for e in run["events"]:
        kind = e["event"]
        if kind == "checkpoint":
            what = f"checkpoint {e.get('dir', e.get('step'))}"
            how = "background" if e.get("background") else "synchronous"
            det = (f"step {e.get('step')}, {how}: training blocked {e.get('blocked_s', 0) + e.get('wait_s', 0):.2f} s, "
                   f"written in {e.get('write_s', 0):.1f} s, {e.get('files_gib', e.get('gib', 0)):.2f} GiB")
        elif kind == "resume":
            what = f"resume from {e.get('from')}"
            det = f"step {e.get('step')}, {e.get('world_size')} rank(s) on {e.get('host')}" + (
                f", Slurm job {e['slurm_job_id']}" if e.get("slurm_job_id") else "")
        elif kind == "samples":
            continue  # the grids themselves are shown
        elif kind == "fid":
            what = f"FID {e.get('fid'):.2f}" if isinstance(e.get("fid"), (int, float)) else "FID"
            det = (f"step {e.get('step')}, {e.get('samples')} samples, {e.get('seconds', 0):.0f} s "
                   "(in-loop: not the paper's 50k FID)")
        else:
            what = "non-finite step skipped"
            det = f"step {e.get('step')}: {e.get('what')} ({e.get('in_row')} in a row)"
        rows.append((float(e.get("time") or 0), what, det))
    for e in run["slurm_events"]:
        det = ", ".join(f"{k} {e[k]}" for k in ("job_id", "restart", "reason", "step", "rc") if e.get(k) is not None)
        rows.append((float(e.get("time") or 0), f"slurm: {e.get('event')}", det))
    return sorted(rows)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def write_report(run_dir: Path, out: Optional[Path] = None, job_dir: Optional[Path] = None) -> Path:
    """Write the report of ``run_dir`` into ``out`` (default: the run folder); returns the HTML's path."""
    run_dir = Path(run_dir)
    if not (run_dir / "stats.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no stats.jsonl (not a `lamamba train` run folder, or no step logged yet)")
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir, job_dir)
    figs = draw(run, out)
    s = run["summary"]
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    rows = "".join(f"<tr><td>{html.escape(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t)) if t else '-')}</td>"
                   f"<td>{html.escape(w)}</td><td>{html.escape(d)}</td></tr>" for t, w, d in _rows(run))
    fmt = lambda v, f="{:.4g}": "-" if v is None else (f.format(v) if isinstance(v, float) else str(v))  # noqa: E731
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in [
        ("last step", s["last_step"]), ("kimg", s["kimg"]), ("last loss", s["last_loss"]),
        ("median img/s", s["median_img_per_s"]), ("peak memory (GiB)", s["peak_mem_gib"]),
        ("last FID (in-loop)", s["last_fid"]), ("checkpoints", s["checkpoints"]),
        ("time blocked by checkpoints (s)", s["checkpoint_blocked_s"]), ("resumes", s["resumes"]),
        ("non-finite steps", s["nonfinite_steps"]), ("Slurm events", s["slurm_events"])])
    grids = "".join(f"<figure>{_img(p)}<figcaption>{html.escape(Path(p).name)}</figcaption></figure>"
                    for p in s["sample_grids"]) or "<p>No sample grids in samples/.</p>"
    figures = "".join(f"<figure>{_img(p)}</figure>" for p in figs.values())
    skipped = f", {s['skipped_lines']} unfinished line(s) skipped" if s["skipped_lines"] else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lamamba report: {html.escape(str(run_dir))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}}
figure{{display:inline-block;margin:4px}}img{{max-width:100%}}</style></head><body>
<h1>Run {html.escape(str(run_dir))}</h1>
<p>Report written {made} from stats.jsonl ({s['records']} log records{skipped}).</p>
<h2>Summary</h2><table id="summary">{table}</table>
<h2>Curves</h2>{figures}
<h2>Latest sample grids</h2>{grids}
<h2>Checkpoints, resumes and requeues</h2><table id="timeline"><tr><th>time</th><th>what</th><th>details</th></tr>{rows}</table>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    (out / "report.json").write_text(json.dumps({"summary": s, "series": run["series"], "figures":
                                                  {k: str(v) for k, v in figs.items()}}, indent=1))
    return path


def add_parser(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("run_dir", help="the run folder ([checkpoint] dir): finished or still training")
    p.add_argument("--out", default=None, help="where to write report.html and the PNGs (default: the run folder)")
    p.add_argument("--job-dir", default=None, help="the Slurm job folder of `lamamba submit` (default: RUN_DIR/slurm)")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamamba_dist.errors import CLIError

    try:
        path = write_report(Path(args.run_dir), Path(args.out) if args.out else None,
                            Path(args.job_dir) if args.job_dir else None)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None
    print(path)
    return 0
