"""`lamamba bench table`: the README's performance table from `lamamba bench` JSON files.

    lamamba bench table b256.json b512.json --commit 91750e6 [--out -]

Each file is one `lamamba bench` run (``{"environment", "results"}``). A row per (resolution, batch, mode, settings)
pairs the DiT model of that run and mode with each LaMamba variant and gives their img/s ratio, so every ratio is
one of a single run. Modes: eager, compiled (`compile=true`), compiled + CUDA graphs (`mode=reduce-overhead`) and
the other compile modes by name; settings are a spec's other keys (e.g. `snake=triton`), shown in the row's label.
Under each resolution a line gives each family's fastest row and their ratio (the figure the 1.0x bar is about).
The header names the GPU, torch and the time from the files' environment blocks, and the commit given with
``--commit`` (the JSON does not record it). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lamamba_dist.bench.common import write_markdown

MODE_NAMES = {None: "eager", "default": "compiled", "reduce-overhead": "compiled + CUDA graphs"}
MODE_KEYS = ("compile", "mode")
ROW_KEYS = ("model", "resolution", "batch", "img_per_s", "time_to_first_step_s")


def _mode(row: dict) -> str:
    if not row.get("compiled"):
        return "eager"
    mode = row.get("compile_mode") or "default"
    return MODE_NAMES.get(mode, f"compiled, {mode}")


def _settings(row: dict) -> str:
    """The spec's keys other than the mode ones, e.g. ``snake=triton`` (empty for the run's defaults)."""
    parts = str(row.get("spec", row.get("model", ""))).split(":")[1:]
    return ":".join(p for p in parts if p.partition("=")[0] not in MODE_KEYS)


def _cell(row: dict) -> str:
    mem = f"{row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else "n/a"
    return f"{row['img_per_s']:.1f} ({mem}, {row['time_to_first_step_s']:.1f} s)"


def _is_baseline(row: dict) -> bool:
    return str(row["model"]).startswith("DiT")


def load(paths: list[str]) -> list[tuple[str, dict, list[dict]]]:
    """(path, environment, results) per file; a clear error for a file that is not `lamamba bench` JSON."""
    runs = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
            env, results = data["environment"], data["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{p}: not a `lamamba bench` JSON file ({type(e).__name__}: {e})") from None
        for i, r in enumerate(results):
            missing = [k for k in ROW_KEYS if k not in r]
            if missing:
                raise SystemExit(f"{p}: result {i} has no {', '.join(missing)} (not a `lamamba bench` model row)")
        runs.append((p, env, results))
    return runs


def render(paths: list[str], commit: str | None = None) -> str:
    runs = load(paths)
    if not runs:
        raise SystemExit("no JSON files given")
    envs = {(e.get("gpu") or e.get("cpu") or e.get("device"), e.get("torch")) for _, e, _ in runs}
    gpu = "; ".join(f"{g}, torch {t}" for g, t in sorted(envs, key=str))
    when = ", ".join(sorted({str(e.get("time_utc", "?"))[:10] for _, e, _ in runs}))
    files = ", ".join(Path(p).name for p, _, _ in runs)
    lines = [f"One `lamamba bench` run per file ({files}); {gpu}; {when}; commit {commit or 'not given'}.", "",
             "| img/s (peak GiB, first step) | DiT | LaMamba | LaMamba / DiT |", "|---|---|---|---|"]
    fastest_lines = []
    for _, _, results in runs:
        by_key: dict = {}
        for r in results:
            by_key.setdefault((r["resolution"], r["batch"]), []).append(r)
        for (res, batch), rows in by_key.items():
            base = {_mode(r): r for r in rows if _is_baseline(r) and not _settings(r)}
            for r in rows:
                if _is_baseline(r):
                    continue
                label = f"{res} px, batch {batch}, {_mode(r)}" + (f", {_settings(r)}" if _settings(r) else "")
                b = base.get(_mode(r))
                ratio = f"{r['img_per_s'] / b['img_per_s']:.2f}x" if b else "no DiT row"
                lines.append(f"| {label} | {_cell(b) if b else ''} | {r['model']}: {_cell(r)} | {ratio} |")
            best_base = max((r for r in rows if _is_baseline(r)), key=lambda r: r["img_per_s"], default=None)
            best = max((r for r in rows if not _is_baseline(r)), key=lambda r: r["img_per_s"], default=None)
            if best and best_base:
                fastest_lines.append(
                    f"- {res} px, batch {batch}, each model's fastest: {best['spec']} {best['img_per_s']:.1f} img/s "
                    f"against {best_base['spec']} {best_base['img_per_s']:.1f} = "
                    f"**{best['img_per_s'] / best_base['img_per_s']:.2f}x** (peak {_gib(best)} against {_gib(best_base)})")
    return "\n".join(lines + [""] + fastest_lines) + "\n"


def _gib(row: dict) -> str:
    return f"{row['peak_gib']:.1f} GiB" if row.get("peak_gib") is not None else "n/a"


def add_parser(sub, name: str, help_text: str):
    ap = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="`lamamba bench` JSON files, one run each")
    ap.add_argument("--commit", default=None, help="the commit the runs measured (named in the header)")
    ap.add_argument("--out", default="-", help="markdown file to write (default -: stdout)")
    ap.set_defaults(func=_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    """``lamamba bench table ARGV`` (tests and ``python -m lamamba_dist.bench.table``)."""
    ap = argparse.ArgumentParser(prog="lamamba")
    add_parser(ap.add_subparsers(dest="command"), "bench-table", "")
    return _run(ap.parse_args(["bench-table", *(sys.argv[1:] if argv is None else argv)]))


def _run(args) -> int:
    write_markdown(args.out, render(args.json, args.commit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
