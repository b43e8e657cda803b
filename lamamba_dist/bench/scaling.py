"""`lamamba bench scaling`: markdown tables of `lamamba bench train` results (and of scripts/gpu_scaling.sh's elastic
run) -> docs/scaling.md.

    lamamba bench scaling OUT/*.json --out docs/scaling.md

Inputs: bench-train JSON files (``{"environment", "results"}``; rows with ``"fit": true`` go to the fit table)
and ``train_elastic.json``. Scaling efficiency = per-GPU img/s on N GPUs / per-GPU img/s on 1 GPU for the same
model, resolution, ZeRO stage, activation checkpointing, micro-batch and accumulation (weak scaling: the per-GPU
batch is fixed). Configurations the plan includes but no file measured, and every 4-GPU row, read "not measured".
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lamamba_dist.bench.common import write_markdown

GPU_COUNTS = (1, 2, 4)
XXL = "LaMamba-XL[base_width=384,num_heads=16]"
# What scripts/gpu_scaling.sh measures: (model, resolution, zero, grad_checkpointing, micro, accum, GPU counts).
PLANNED = (
    [("LaMamba-XL", 256, z, gc, 32, 1, (1,) if z == 0 else GPU_COUNTS) for z in (0, 1, 2, 3) for gc in (False, True)]
    + [("DiT-XL/2", 256, 2, False, 32, 1, GPU_COUNTS)]
    + [("LaMamba-XL", 512, 2, gc, 8, 1, GPU_COUNTS) for gc in (False, True)]
)
PLANNED_FIT = [(m, 256, z, False, GPU_COUNTS) for m in ("LaMamba-XL", XXL) for z in (2, 3)]

REPRODUCE = """\
On a machine with 2 H200s, from the repository root, with torch, deepspeed and mamba_ssm importable:

```bash
bash scripts/gpu_scaling.sh OUT                                  # ~8 min, parts in priority order (see the script)
lamamba bench scaling OUT/*.json --out docs/scaling.md
```

One launch per GPU count measures a whole matrix (the engine is rebuilt and freed between rows):

```bash
python3 -m lamamba_dist.cli bench-train --config configs/lamamba_XL_256.toml --micro-batch 32 --warmup 3 --steps 8 \\
    --matrix "zero=0,1,2,3;gc=false,true" --matrix "config=configs/dit_xl2_256.toml;zero=2;gc=false" \\
    --matrix "config=configs/lamamba_XL_512.toml;micro=8;zero=2;gc=false,true" --out bench_1gpu.json
python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m lamamba_dist.cli bench-train \\
    --config configs/lamamba_XL_256.toml --micro-batch 32 --warmup 3 --steps 8 --matrix "zero=1,2,3;gc=false,true" \\
    --matrix "config=configs/dit_xl2_256.toml;zero=2;gc=false" \\
    --matrix "config=configs/lamamba_XL_512.toml;micro=8;zero=2;gc=false,true" --out bench_2gpu.json
python3 -m lamamba_dist.cli bench-train --config configs/lamamba_XL_256.toml --config configs/lamamba_XXL_256.toml \\
    --matrix "zero=2,3" --fit-batch --fit-probes 16,32 --out fit_1gpu.json
```
"""


def _f(x, spec: str, suffix: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + suffix


def load(paths: list[str]) -> tuple[list[dict], list[dict], list[dict], dict | None]:
    """(bench rows, fit rows, environments with their file, elastic summary) from the given JSON files."""
    rows, fits, envs, elastic = [], [], [], None
    for p in paths:
        data = json.loads(Path(p).read_text())
        if "loss_after_resume" in data:
            elastic = data
            continue
        env = dict(data.get("environment", {}))
        env["file"] = Path(p).name
        envs.append(env)
        for r in data.get("results", []):
            (fits if r.get("fit") else rows).append(r)
    return rows, fits, envs, elastic


def _key(r: dict) -> tuple:
    return (r.get("model"), r.get("resolution"), r.get("zero_stage"), bool(r.get("grad_checkpointing")),
            r.get("micro_batch"), r.get("accum", 1))


def _status(r: dict) -> str:
    return "OOM" if r.get("error_kind") == "oom" else "error"


def scaling_table(rows: list[dict]) -> str:
    measured: dict[tuple, dict] = {}
    for r in rows:
        if "error" not in r or (_key(r), r["world_size"]) not in measured:  # a success beats an error row
            measured[(_key(r), r["world_size"])] = r
    keys: list[tuple] = []
    gpus: dict[tuple, set] = {}
    for m, res, z, gc, micro, accum, counts in PLANNED:
        k = (m, res, z, gc, micro, accum)
        keys.append(k)
        gpus[k] = set(counts)
    for (k, w) in measured:
        if k not in gpus:
            keys.append(k)
            gpus[k] = set(GPU_COUNTS)
        gpus[k].add(w)
    out = ["| model | px | ZeRO | act. ckpt | micro/GPU | GPUs | img/s/GPU | img/s total | scaling eff. | step ms "
           "| peak GiB/GPU | MFU |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        m, res, z, gc, micro, accum = k
        base = measured.get((k, 1))
        base_ips = base.get("img_per_s_per_gpu") if base and "error" not in base else None
        for w in sorted(gpus[k]):
            head = (f"| {m} | {res} | {z} | {'on' if gc else 'off'} | {micro}{f' x{accum} accum' if accum != 1 else ''} "
                    f"| {w} |")
            r = measured.get((k, w))
            if r is None:
                out.append(head + " not measured | | | | | |")
            elif "error" in r:
                out.append(head + f" {_status(r)}: {r['error'][:80].replace('|', '/')} | | | | | |")
            else:
                ips = r["img_per_s_per_gpu"]
                eff = f"{ips / base_ips:.2f}" if base_ips else "n/a"
                out.append(head + f" {ips:.1f} | {r['img_per_s']:.1f} | {eff} | {_f(r.get('step_ms'), '.0f')} "
                           f"| {_f(r.get('peak_gib'), '.1f')} | {_f(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', '%')} |")
    return "\n".join(out)


def fit_table(fits: list[dict]) -> str:
    measured: dict[tuple, dict] = {}
    for r in fits:
        measured[(r.get("model"), r.get("resolution"), r.get("zero_stage"), bool(r.get("grad_checkpointing")),
                  r["world_size"])] = r
    keys = [(m, res, z, gc, w) for m, res, z, gc, counts in PLANNED_FIT for w in counts]
    keys += [k for k in measured if k not in keys]
    out = ["| model | px | ZeRO | act. ckpt | GPUs | largest micro-batch (verified) | predicted | static GiB "
           "| GiB/sample | peak GiB at it | img/s/GPU at it | MFU at it |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in keys:
        m, res, z, gc, w = k
        head = f"| {m} | {res} | {z} | {'on' if gc else 'off'} | {w} |"
        r = measured.get(k)
        if r is None:
            out.append(head + " not measured | | | | | | |")
            continue
        if r.get("fit_micro_batch"):
            first = f"{r['fit_micro_batch']}"
        else:
            first = f"{_status(r)}: {str(r.get('error', ''))[:80].replace('|', '/')}"
        out.append(head + f" {first} | {r.get('predicted_micro_batch', 'n/a')} | {_f(r.get('static_gib'), '.1f')} "
                   f"| {_f(r.get('per_sample_gib'), '.3f')} | {_f(r.get('peak_gib'), '.1f')} "
                   f"| {_f(r.get('img_per_s_per_gpu') if r.get('fit_micro_batch') else None, '.1f')} "
                   f"| {_f(None if r.get('mfu') is None or not r.get('fit_micro_batch') else 100 * r['mfu'], '.1f', '%')} |")
    return "\n".join(out)


def elastic_section(e: dict | None) -> str:
    if not e:
        return "Not measured (part d of scripts/gpu_scaling.sh)."
    wf, wt = e.get("world_sizes", [2, 1])
    lines = [e.get("what", ""), "",
             f"| step | loss, {wf} GPUs | loss, resumed on {wt} GPU(s) | relative difference |", "|---|---|---|---|"]
    for r in e.get("loss_after_resume", []):
        lines.append(f"| {r['step']} | {r[f'loss_{wf}gpu']:.5f} | {r[f'loss_{wt}gpu_resumed']:.5f} | {r['rel_diff']:.2e} |")
    lines += ["", f"Largest relative difference: {_f(e.get('max_rel_diff'), '.2e')} (step-to-step standard deviation of "
                  f"the {wf}-GPU losses: {_f(e.get('loss_std_2gpu'), '.4f')}); last step trained: "
                  f"{e.get('last_step_logged')}; all losses finite: {e.get('all_losses_finite')}.",
              f"Real trainer img/s (mean of the per-step log records): {wf} GPUs "
              f"{_f(e.get(f'img_per_s_{wf}gpu'), '.1f')}, {wt} GPU(s) (accum 2) "
              f"{_f(e.get(f'img_per_s_{wt}gpu_accum2'), '.1f')}.", ""]
    for key in ("elastic_lines", "resume_lines", "saved_lines"):
        for line in e.get(key, []):
            lines.append(f"    {line}")
    return "\n".join(lines)


def render(paths: list[str]) -> str:
    rows, fits, envs, elastic = load(paths)
    env_lines = []
    for env in envs:
        env_lines.append(f"- `{env['file']}`: {env.get('world_size')} x {env.get('gpu', env.get('device', '?'))}, "
                         f"torch {env.get('torch')}, deepspeed {env.get('deepspeed')}, fused scan "
                         f"{env.get('fused_scan')}, {env.get('time_utc', '')}; `{env.get('command', '')}`")
    return "\n".join([
        "# Training throughput, memory and scaling (`lamamba bench-train`)",
        "",
        "Generated by `lamamba bench scaling` (lamamba_dist/bench/scaling.py) from the JSON files of `scripts/gpu_scaling.sh`. Each row is the real",
        "training step of `lamamba train` (DeepSpeed ZeRO engine from the config, bf16, diffusion loss, EMA update,",
        "synthetic latents through the real loader), timed after warm-up; img/s/GPU = global img/s / GPUs; scaling",
        "efficiency = img/s/GPU on N GPUs / img/s/GPU on 1 GPU at the same per-GPU batch (weak scaling); peak GiB =",
        "`torch.cuda.max_memory_allocated`, max over ranks; MFU = model FLOPs (6 x the forward multiply-adds per image,",
        "`lamamba flops`, recomputation not counted) / 790 TFLOP/s. Rows without a measurement read 'not measured'.",
        "",
        "## Measurements",
        "",
        *(env_lines or ["None yet: every row below reads \"not measured\"."]),
        "",
        "## Throughput and scaling",
        "",
        scaling_table(rows),
        "",
        "## Largest micro-batch per GPU (`--fit-batch`)",
        "",
        "Peak memory at two probe micro-batches on one engine, a straight line through them, the largest micro-batch",
        "under the GPU memory minus 8 GiB, verified by training steps at it (10% smaller per OOM).",
        f"`{XXL}` is `configs/lamamba_XXL_256.toml`, a config-only model.",
        "",
        fit_table(fits),
        "",
        "## Elastic resume of the real trainer (2 GPUs -> 1 GPU) after 50+ steps",
        "",
        elastic_section(elastic),
        "",
        "## Reproduce",
        "",
        REPRODUCE,
    ])


def add_parser(sub, name: str, help_text: str):
    ap = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="bench train / train_elastic JSON files")
    ap.add_argument("--out", default="docs/scaling.md", help="markdown file to write (- for stdout)")
    ap.set_defaults(func=_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    """``lamamba bench scaling ARGV`` (tests and ``python -m lamamba_dist.bench.scaling``)."""
    ap = argparse.ArgumentParser(prog="lamamba")
    add_parser(ap.add_subparsers(dest="command"), "bench-scaling", "")
    return _run(ap.parse_args(["bench-scaling", *(sys.argv[1:] if argv is None else argv)]))


def _run(args) -> int:
    write_markdown(args.out, render(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
