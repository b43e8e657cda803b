"""`lamamba bench` (or `lamamba bench model`): training-step throughput of several models measured in one process.

Each step is the plain training step of lamamba_dist/train/step.py in ``lamamba train``'s precision: on GPUs by
default bf16 weights with fp32 master weights (``--precision bf16``; ``bf16_autocast``: fp32 weights under bf16
autocast; fp32 on CPUs unless asked), AdamW (fused on CUDA), the real diffusion loss (MSE + VLB) on random latents
and labels, backward, optimizer step. No data loader, EMA, DeepSpeed or non-finite check: ``lamamba bench-train``
runs the trainer's own step (lamamba_dist/bench/train.py), and scripts/gpu_check.sh sets the two against each
other.
Models run one after another in the same mode (eager vs eager, compiled vs compiled); warm-up steps are
excluded from the timing; the first model in the list is the baseline of the reported ratios.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from lamamba_dist.bench.common import environment, write_json
from lamamba_dist.bench.memory import memory_profile as profile_memory, require_cuda
from lamamba_dist.bench.profiling import _sync, host_profile, profile_steps
from lamamba_dist.models.compile import COMPILE_MODES, compile_blocks, uses_cudagraphs
from lamamba_dist.ops.cross_scan import SNAKE_BACKENDS
from lamamba_dist.ops.dwconv import CONV_BACKENDS
from lamamba_dist.ops.selective_scan import BACKENDS as SCAN_BACKENDS
from lamamba_dist.ops.ss2d_core import CORES
from lamamba_dist.ops.window_attention import BACKENDS as ATTN_BACKENDS
from lamamba_dist.train.step import PRECISIONS, TrainStep

def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak used for MFU (lamamba_dist/flops.py), None off GPUs or for an unknown GPU."""
    from lamamba_dist.flops import peak_bf16_tflops

    return peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def bench_model(name: str, resolution: int, batch: int, steps: int, warmup: int, device: torch.device,
                precision: str, compile_model: bool, grad_checkpointing: bool = False,
                scan_backend: str = "auto", attn_backend: str = "auto", peak_tflops: float | None = None,
                memory_budget: float | None = None, lean_scan_backward: bool = True, profile: int = 0,
                host_profile_steps: int = 0, compile_mode: str = "default", conv_backend: str = "auto",
                snake_backend: str = "auto", memory_profile: bool = False, scan_core: str = "auto",
                compile_glue: bool = True) -> dict:
    from lamamba_dist.diffusion import create_diffusion
    from lamamba_dist.flops import train_flops_per_image
    from lamamba_dist.models import create_model

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs (an XL model's CPU init takes seconds; as bench-train does)
        model = create_model(name, resolution=resolution, grad_checkpointing=grad_checkpointing,
                             scan_backend=scan_backend, attn_backend=attn_backend,
                             lean_scan_backward=lean_scan_backward, conv_backend=conv_backend,
                             snake_backend=snake_backend, scan_core=scan_core)
    model.train()
    diffusion = create_diffusion()
    # the plain training step (lamamba_dist/train/step.py), built before compiling (bf16 casts the weights)
    cudagraphs = compile_model and device.type == "cuda" and uses_cudagraphs(compile_mode)
    train_step = TrainStep(model, diffusion, precision, lr=1e-4, weight_decay=0.01, cudagraphs=cudagraphs)
    if compile_model:
        compile_blocks(model, mode=compile_mode, memory_budget=memory_budget, glue=compile_glue)
    s = model.latent_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, s, s, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)

    def step():
        return train_step(x, diffusion.sample_t(batch, device), y)

    loss = step()
    _sync(device)
    first_step_s = time.perf_counter() - t_start
    compile_info = None
    if compile_model:
        from torch._dynamo.utils import counters

        from torch._dynamo.utils import compile_times

        names, secs = compile_times(repr="csv", aggregate=True)
        compile_info = dict(unique_graphs=int(counters["stats"]["unique_graphs"]),
                            graph_breaks=int(sum(counters["graph_break"].values())),
                            seconds={n: float(v) for n, v in zip(names, secs) if _is_number(v)})
    for _ in range(max(warmup - 1, 0)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    step_s = elapsed / steps
    img_s = batch / step_s
    flops_img = train_flops_per_image(name, resolution)
    tflops = img_s * flops_img / 1e12
    res = dict(model=name, resolution=resolution, batch=batch, steps=steps, warmup=warmup, precision=precision,
               compiled=compile_model, compile_mode=compile_mode if compile_model else None,
               compile_glue=compile_glue if compile_model else None,
               grad_checkpointing=grad_checkpointing,
               memory_budget=memory_budget if compile_model else None,
               scan_backend=scan_backend, attn_backend=attn_backend, conv_backend=conv_backend,
               snake_backend=snake_backend, scan_core=scan_core,
               lean_scan_backward=lean_scan_backward,
               img_per_s=img_s, step_ms=step_s * 1e3, model_tflops_per_s=tflops,
               mfu=(tflops / peak_tflops) if peak_tflops else None,
               train_gflops_per_img=flops_img / 1e9, time_to_first_step_s=first_step_s,
               final_loss=float(loss.detach()), compile=compile_info,
               peak_gib=(torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
               params=sum(p.numel() for p in model.parameters()))
    if profile:
        res["profile"] = profile_steps(step, profile, device)
    if host_profile_steps:
        res["host_profile"] = host_profile(step, host_profile_steps, device)
    if memory_profile:
        res["memory_profile"] = profile_memory(step, device)
    return res  # model, optimizer and activations are freed with this frame


def environment_info(device: torch.device) -> dict:
    """The environment block of the bench JSON (lamamba_dist/bench/common.py)."""
    return environment(device)


# Settings of one model in ``--models``: ``NAME[:key=value...]``, e.g. ``LaMamba-XL:scan=mixed:conv=triton`` or
# ``DiT-XL/2:compile=true``; each key overrides the command's option of the same meaning for that model only, so
# one run can hold each model in its own fastest mode, or several variants of one model, beside the baseline.
SPEC_KEYS = {"scan": "scan_backend", "attn": "attn_backend", "conv": "conv_backend", "snake": "snake_backend",
             "core": "scan_core",
             "compile": "compile_model", "mode": "compile_mode", "glue": "compile_glue"}


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``"NAME[:key=value...]"`` -> (registry name, ``bench_model`` keyword overrides); raises ValueError."""
    name, *parts = spec.split(":")
    choices = {"scan_backend": SCAN_BACKENDS, "attn_backend": ATTN_BACKENDS, "conv_backend": CONV_BACKENDS,
               "snake_backend": SNAKE_BACKENDS, "scan_core": CORES,
               "compile_mode": COMPILE_MODES, "compile_model": ("true", "false"), "compile_glue": ("true", "false")}
    out: dict = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise ValueError(f"model spec {spec!r}: {part!r} is not one of {', '.join(k + '=...' for k in SPEC_KEYS)}")
        arg = SPEC_KEYS[key]
        if value not in choices[arg]:
            raise ValueError(f"model spec {spec!r}: {key}={value!r}, expected one of {', '.join(choices[arg])}")
        out[arg] = value == "true" if arg in ("compile_model", "compile_glue") else value
    return name, out


def run_bench(models: list[str], resolution: int, batch, steps: int, warmup: int, device: str | None = None,
              precision: str | None = None, compile_model: bool = False, grad_checkpointing: bool = False,
              peak_tflops: float | None = None, scan_backend: str = "auto", attn_backend: str = "auto",
              memory_budget: float | None = None, lean_scan_backward: bool = True, profile: int = 0,
              host_profile_steps: int = 0, compile_mode: str = "default", conv_backend: str = "auto",
              snake_backend: str = "auto", memory_profile: bool = False, scan_core: str = "auto",
              compile_glue: bool = True) -> dict:
    """One row per (batch, model), batches in the given order (``batch``: an int or a list of them); the ratios
    are to the first model at the same batch. A model may carry its own settings (:func:`parse_model_spec`)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if memory_profile:
        require_cuda(dev)
    peak = peak_tflops or device_peak_tflops(dev)
    settings = []  # (spec, name, bench_model keywords) per model, checked before anything runs
    for spec in models:
        name, own = parse_model_spec(spec)
        kw = dict(compile_model=compile_model, scan_backend=scan_backend, attn_backend=attn_backend,
                  compile_mode=compile_mode, conv_backend=conv_backend, snake_backend=snake_backend,
                  scan_core=scan_core, compile_glue=compile_glue)
        kw.update(own)
        if kw["compile_mode"] != "default" and not kw["compile_model"]:
            raise ValueError(f"model spec {spec!r}: compile mode {kw['compile_mode']!r} needs compile")
        if own.get("compile_glue") and not kw["compile_model"]:
            raise ValueError(f"model spec {spec!r}: glue=true (compiling the modules between stages) needs compile")
        settings.append((spec, name, kw))
    results = []
    for b in [batch] if isinstance(batch, int) else list(batch):
        rows = []
        for spec, name, kw in settings:
            print(f"# bench {spec}, batch {b}: building, first step ...", flush=True)
            row = bench_model(name, resolution, b, steps, warmup, dev, precision,
                              grad_checkpointing=grad_checkpointing, peak_tflops=peak,
                              memory_budget=memory_budget if kw["compile_model"] else None,
                              lean_scan_backward=lean_scan_backward, profile=profile,
                              host_profile_steps=host_profile_steps, memory_profile=memory_profile, **kw)
            rows.append({"spec": spec, **row})
            mem = f"{row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "n/a"
            print(f"# done {spec}, batch {b}: {row['img_per_s']:.1f} img/s, peak {mem}, first step "
                  f"{row['time_to_first_step_s']:.1f}s", flush=True)  # kept in the log if the run is cut short
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        base = rows[0]
        for r in rows:
            r["img_per_s_ratio_to_first"] = r["img_per_s"] / base["img_per_s"]
            if r["peak_gib"] is not None and base["peak_gib"]:
                r["peak_memory_ratio_to_first"] = r["peak_gib"] / base["peak_gib"]
        results += rows
    base = results[0]
    return dict(bench="model", environment=environment_info(dev), baseline=base["spec"], peak_tflops=peak,
                results=results)


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="DiT-XL/2,LaMamba-XL",
                   help="comma-separated registry names, each optionally with its own settings NAME[:key=value...] "
                        "(keys: scan, attn, conv, snake, core, compile, mode, glue; e.g. "
                        "LaMamba-XL:scan=mixed:conv=triton); "
                        "the first is the baseline of the ratios")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", default="64", help="batch size, or several separated by commas (e.g. 32,64): one row "
                                                "per batch and model, in one process")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model (the first included)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16: bf16 weights with fp32 master weights, as `lamamba train` by default; bf16_autocast: "
                        "fp32 weights under bf16 autocast; fp32 (TF32 matmuls on GPUs). Default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks of every model (regional compilation, same mode for all)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="with --compile: torch.compile's mode; reduce-overhead replays each block as a CUDA graph")
    p.add_argument("--compile-glue", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compile: also the modules between LaMamba-Diff's stages (patch merging / expanding; "
                        "lamamba_dist/models/compile.py glue_types), not only the blocks (default; --no-compile-glue: "
                        "the blocks alone, as [train] compile_glue = false)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="with --compile: AOT autograd's activation memory budget in [0, 1] for every model (1 = torch's "
                        "default; lower recomputes more in the backward to keep less)")
    p.add_argument("--scan-backend", choices=SCAN_BACKENDS, default="auto",
                   help="selective scan kernel of the LaMamba models (auto: on CUDA the Triton d_state-1 kernel up to 1024 steps, mamba-ssm's above; lamamba_dist/ops/selective_scan.py)")
    p.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="auto",
                   help="window attention kernel of the LaMamba models")
    p.add_argument("--conv-backend", choices=CONV_BACKENDS, default="auto",
                   help="SS2D's depthwise conv + SiLU of the LaMamba models (lamamba_dist/ops/dwconv.py)")
    p.add_argument("--snake-backend", choices=SNAKE_BACKENDS, default="auto",
                   help="SS2D's merge of the four scan directions and its adjoint (auto: the Triton kernels of "
                        "lamamba_dist/ops/cross_scan_triton.py on CUDA, torch's gathers elsewhere)")
    p.add_argument("--scan-core", choices=CORES, default="auto",
                   help="how SS2D's lean scan core reaches autograd (lamamba_dist/ops/ss2d_core.py): function (traced "
                        "by torch.compile, whose partitioner then saves the snake copies), op (custom ops, opaque to "
                        "it); auto = op")
    p.add_argument("--plain-scan-backward", action="store_true",
                   help="LaMamba: plain autograd through the SS2D scan core (keeps the (B,4,D,L) snake copies and "
                        "deltas) instead of the lean backward, for A/B measurements")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak used for MFU")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, N more under torch.profiler: CPU and device time per step, kernel "
                        "launches, host syncs, the top CPU operators and device kernels (in the JSON)")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="after the timed steps (and --profile's), N more with the host sampled instead (far cheaper "
                        "than torch.profiler): where the main thread's wall time goes by Python line, GC time, host "
                        "syncs and their lines (in the JSON)")
    p.add_argument("--memory-profile", action="store_true",
                   help="after the timed steps (and the profiles), one more with the CUDA allocator's history "
                        "recorded: what is live at the step's peak, by allocation site (in the JSON; "
                        "lamamba_dist/bench/memory.py). With CUDA graphs the graphs' pools were allocated before "
                        "that step and count as one sum")
    p.add_argument("--out", default=None, help="write the JSON here (always printed)")
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    from lamamba_dist.errors import CLIError
    from lamamba_dist.models import MODELS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        names = [parse_model_spec(m)[0] for m in models]
    except ValueError as e:
        raise CLIError(str(e)) from None
    bad = [m for m in names if m not in MODELS]
    if bad or not models:
        raise CLIError(f"unknown model(s) {bad}; valid names: {', '.join(MODELS)}")
    try:
        batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        raise CLIError(f"--batch {args.batch!r}: give a batch size or several separated by commas") from None
    if not batches or min(batches) < 1 or args.steps < 1:
        raise CLIError("--batch and --steps must be >= 1")
    if args.memory_budget is not None and not (args.compile and 0.0 <= args.memory_budget <= 1.0):
        raise CLIError(f"--memory-budget {args.memory_budget}: needs --compile and a value in [0, 1]")
    if args.compile_mode != "default" and not args.compile:
        raise CLIError(f"--compile-mode {args.compile_mode}: needs --compile")
    try:
        out = run_bench(models, args.resolution, batches, args.steps, args.warmup, args.device, args.precision,
                        args.compile, args.grad_checkpointing, args.peak_tflops, args.scan_backend, args.attn_backend,
                        args.memory_budget, not args.plain_scan_backward, args.profile, args.host_profile,
                        args.compile_mode, args.conv_backend, args.snake_backend, args.memory_profile,
                        args.scan_core, args.compile_glue)
    except ValueError as e:  # a model spec's compile mode without compile, a memory profile off CUDA
        raise CLIError(str(e)) from None
    text = write_json(args.out, out)
    print(text)
    for r in out["results"]:
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"# {r['spec']:12s} batch {r['batch']:4d} {r['img_per_s']:9.1f} img/s  x{r['img_per_s_ratio_to_first']:.2f}  "
              f"peak {mem}  MFU {mfu}  first step {r['time_to_first_step_s']:.1f}s")
        mp = r.get("memory_profile")
        if mp:
            print(f"#   at the peak ({mp['replayed_peak_gib']:.2f} GiB; allocator {mp['peak_allocated_gib']:.2f}): "
                  f"{mp['allocated_before_step_gib']:.2f} GiB from before the step, then by site:")
            for site in mp["sites"][:8]:
                print(f"#     {site['gib']:7.3f} GiB in {site['count']:4d} blocks  {site['site']}  {site['code'][:80]}"
                      f"{'  [' + site['model_frame'] + ']' if site['model_frame'] else ''}")
    return 0
