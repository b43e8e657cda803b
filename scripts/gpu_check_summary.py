"""The summary JSON of scripts/gpu_check.sh, from the files its parts left in OUT (missing parts are reported so).

    python scripts/gpu_check_summary.py OUT [--micro 32] [--rtol 0.02] [--kill-at 60]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 600) -> str | None:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return None


def tests(out: Path) -> dict | None:
    xmls = sorted(out.glob("gpu_tests*.xml"))
    rc_file = out / "gpu_tests.rc"
    rc = rc_file.read_text().strip() if rc_file.is_file() else None
    if not xmls and rc is None:
        return None
    n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    times: list[tuple[float, str]] = []
    for xml in xmls:
        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
            for k in n:
                n[k] += int(suite.get(k, 0))
            failed += [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None]
            times += [(float(c.get("time") or 0), f"{c.get('classname')}::{c.get('name')}") for c in suite.iter("testcase")]
    res = {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": failed, "rc": rc,
           "report": bool(xmls),  # no report: pytest was killed by its timeout
           "slowest_s": {name: round(t, 1) for t, name in sorted(times, reverse=True)[:6]}}
    res["ok"] = bool(xmls) and not failed and rc in ("0", "5") and n["tests"] > n["skipped"]  # 5: all skipped
    if not res["ok"]:
        res["log_tail"] = _tail(out / "gpu_tests.log", 3000)
    return res


def resume(out: Path, rtol: float, kill_at: int = 60) -> dict | None:
    stats = out / "resume" / "stats.jsonl"
    if not stats.is_file():
        return None
    legs: list[dict[int, float]] = [{}]
    last = 0
    for line in stats.read_text().splitlines():
        rec = json.loads(line)
        if "event" in rec or rec.get("loss") is None:
            continue
        if rec["step"] <= last:  # the rerun starts again after the checkpoint
            legs.append({})
        legs[-1][rec["step"]] = rec["loss"]
        last = rec["step"]
    second_log = (out / "resume_second.log").read_text(errors="replace") if (out / "resume_second.log").is_file() else ""
    m = re.search(r"resumed from \S*(step_\d+)", second_log)
    rc = (out / "resume_second.rc").read_text().strip() if (out / "resume_second.rc").is_file() else None
    res: dict = {"legs": len(legs), "killed_after_step": max(legs[0]) if legs[0] else None,
                 "resumed_from": m.group(1) if m else None, "rerun_rc": rc,
                 "rerun_steps": [min(legs[-1]), max(legs[-1])] if len(legs) > 1 and legs[-1] else None}
    if len(legs) == 2:
        common = sorted(set(legs[0]) & set(legs[1]))
        rel = [abs(legs[1][s] - legs[0][s]) / max(abs(legs[0][s]), 1e-12) for s in common]
        res.update(compared_steps=[common[0], common[-1]] if common else None,
                   max_rel_diff=max(rel) if rel else None,
                   losses_first={s: legs[0][s] for s in common}, losses_rerun={s: legs[1][s] for s in common})
    res["ok"] = bool(len(legs) == 2 and rc == "0" and res["resumed_from"] == "step_00000050"
                     and res["killed_after_step"] >= kill_at
                     and res.get("compared_steps") == [51, res["killed_after_step"]] and res["rerun_steps"] == [51, 70]
                     and res.get("max_rel_diff") is not None and res["max_rel_diff"] <= rtol)
    res["rtol"] = rtol
    if not res["ok"]:
        res["first_log_tail"] = _tail(out / "resume_first.log")
        res["rerun_log_tail"] = _tail(out / "resume_second.log")
    return res


def ratios(out: Path, mode: str) -> dict | None:
    benches = [_read_json(p) for p in sorted(out.glob(f"bench_{mode}*.json"))]
    train = _read_json(out / f"train_{mode}.json")
    if not benches and train is None:
        return None
    res: dict = {"rows": []}
    # bench_<mode>.json, and bench_<mode>_after.json where the model rows ran again after the trainer's (ABA=1):
    # the model figure is then the mean of the two, and their ratio shows how much the machine drifted
    model_rows: dict = {}
    for b in benches:
        for r in (b or {}).get("results", []):
            # keyed by the bench's model spec: a variant ("NAME:key=value") is not the trainer's model
            model_rows.setdefault((r.get("spec", r["model"]), r["batch"]), []).append(r)
    for tr in (train or {}).get("results", []):
        runs = model_rows.get((tr.get("model"), tr.get("micro_batch")), [])
        b = dict(runs[0], step_ms=sum(r["step_ms"] for r in runs) / len(runs),
                 img_per_s=sum(r["img_per_s"] for r in runs) / len(runs)) if runs else None
        row = {"model": tr.get("model"), "micro_batch": tr.get("micro_batch"), "matrix": tr.get("matrix"),
               "zero_stage": tr.get("zero_stage"),
               "precision": tr.get("precision"), "train_step_ms": tr.get("step_ms"),
               "train_img_per_s": tr.get("img_per_s"), "train_peak_gib": tr.get("peak_gib"),
               "train_first_step_s": tr.get("first_step_s"), "error": tr.get("error")}
        if tr.get("profile"):
            row["train_profile"] = {k: v for k, v in tr["profile"].items() if not k.startswith("top_")}
        if b:
            row.update(bench_step_ms=b["step_ms"], bench_img_per_s=b["img_per_s"], bench_peak_gib=b.get("peak_gib"),
                       bench_first_step_s=b.get("time_to_first_step_s"))
            if len(runs) > 1:
                row["bench_step_ms_each"] = [r["step_ms"] for r in runs]
                row["bench_drift"] = runs[-1]["step_ms"] / runs[0]["step_ms"]
            if b.get("profile"):
                row["bench_profile"] = {k: v for k, v in b["profile"].items() if not k.startswith("top_")}
            if tr.get("step_ms"):
                row["train_over_bench"] = tr["step_ms"] / b["step_ms"]
        res["rows"].append(row)
    missing = [p.name for p in sorted(out.glob(f"bench_{mode}*.log"))
               if not (out / p.name.replace(".log", ".json")).is_file()]
    if missing:
        res["bench_errors"] = {m: _tail(out / m) for m in missing}
    if train is None:
        res["train_error"] = _tail(out / f"train_{mode}.log")
    res["train_ok"] = bool(res["rows"]) and all(not r["error"] for r in res["rows"]) and train is not None
    res["ratio_ok"] = res["train_ok"] and all(r.get("train_over_bench", math.inf) <= 1.05 for r in res["rows"])
    return res


def precision_ab(out: Path) -> list | None:
    data = _read_json(out / "precision_ab.json")
    if data is None:
        return None
    return [{k: r.get(k) for k in ("model", "precision", "img_per_s", "step_ms", "peak_gib", "final_loss", "steps",
                                   "error")} for r in data.get("results", [])]


def background_save(out: Path, threshold_s: float = 3.0) -> dict | None:
    """Part CKPT: the periodic save's blocked time (at most ``threshold_s``), and img/s over the 10-step windows
    written while it is written (after the save, ended before its last file was) against the windows without a
    save in flight: before the save (the first window is warm-up) and after the write (started after it ended).
    Comparing to both sides keeps a drift of the machine's speed over the run out of the ratio; the ratios to
    each side alone are reported too. A window holding the next save's wait for this one is in neither."""
    stats = out / "ckpt" / "stats.jsonl"
    if not stats.is_file():
        return None
    recs = [json.loads(l) for l in stats.read_text().splitlines() if l.strip()]
    saves = [r for r in recs if r.get("event") == "checkpoint"]
    windows = [r for r in recs if "event" not in r and r.get("sec_per_step")]
    res: dict = {"saves": saves, "windows": [(r["step"], round(r["img_per_s"], 1)) for r in windows]}
    if saves:
        sv = saves[0]
        ended = sv.get("write_ended", sv["time"])
        later = saves[1]["step"] if len(saves) > 1 else float("inf")
        before = [r for r in windows[1:] if r["step"] <= sv["step"]]
        after_save = [r for r in windows if r["step"] > sv["step"]]
        during = [r for r in after_save if r["time"] <= ended] or after_save[:1]
        starts = {b["step"]: a["time"] for a, b in zip(windows, windows[1:])}  # a window starts where the last ended
        after = [r for r in after_save if r not in during and starts.get(r["step"], 0.0) >= ended
                 and r["step"] < later]
        spd = lambda rs: sum(r["sec_per_step"] for r in rs) / len(rs)  # noqa: E731 (equal-size windows)
        if (before or after) and during:
            res["img_per_s_ratio"] = spd(before + after) / spd(during)
            for side, rs in (("before", before), ("after", after)):
                if rs:
                    res[f"img_per_s_ratio_to_{side}"] = spd(rs) / spd(during)
            res["compared"] = {"before": [r["step"] for r in before], "during": [r["step"] for r in during],
                               "after": [r["step"] for r in after]}
        res["blocked_s"] = sv["blocked_s"] + sv["wait_s"]
    res["ok"] = bool(saves and res["blocked_s"] <= threshold_s and res.get("img_per_s_ratio", 0) >= 0.95)
    return res


SOURCE_DIRS = ("lamamba_dist", "scripts", "tests", "configs", "cluster", "data_pipeline")


def source_digest(root: Path) -> str:
    """sha256 over the code that ran (path and bytes of every file of SOURCE_DIRS and pyproject.toml, sorted,
    caches left out): a figure can be tied to a commit even where the machine's git metadata is not current.
    ``python scripts/gpu_check_summary.py --digest`` prints it for a checkout."""
    import hashlib

    h = hashlib.sha256()
    files = [root / "pyproject.toml"] + sorted(
        f for d in SOURCE_DIRS for f in (root / d).rglob("*")
        if f.is_file() and "__pycache__" not in f.parts and not f.name.startswith("_call") and f.suffix != ".pyc")
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def main(argv=None) -> int:
    if argv is None and sys.argv[1:] == ["--digest"] or argv == ["--digest"]:
        print(source_digest(Path(__file__).resolve().parents[1]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--micro", type=int, default=32)
    p.add_argument("--rtol", type=float, default=0.02)
    p.add_argument("--kill-at", type=int, default=60, help="the step after which the first resume run was killed")
    a = p.parse_args(argv)
    out = Path(a.out)
    env = None
    for name in ("train_eager.json", "train_compiled.json", "precision_ab.json"):
        d = _read_json(out / name)
        if d:
            env = {k: d["environment"].get(k) for k in ("gpu", "torch", "cuda", "deepspeed", "fused_scan")}
            break
    try:
        import subprocess

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    summary = {"commit": commit or None, "source_digest": source_digest(Path(__file__).resolve().parents[1]),
               "micro_batch": a.micro, "environment": env, "tests": tests(out),
               "resume": resume(out, a.rtol, a.kill_at), "eager": ratios(out, "eager"), "compiled": ratios(out, "compiled"),
               "precision_ab": precision_ab(out), "background_save": background_save(out),
               "timeline": (out / "timeline.txt").read_text().splitlines() if (out / "timeline.txt").is_file() else None}
    if summary["timeline"]:  # the last mark ("<s>s summary"): the check's own duration
        summary["wall_s"] = int(summary["timeline"][-1].split("s ", 1)[0])
    parts = [summary["tests"], summary["resume"]]
    summary["pass"] = bool(all(x is not None and x["ok"] for x in parts) and summary["compiled"] is not None
                           and summary["compiled"]["train_ok"])
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
