"""``lamamba bench train --fit-batch``: the largest micro-batch of a configuration that fits the GPU. Peak memory at
two probe micro-batches, a straight line through them, the largest micro-batch under the budget, then a verified
run at it (10% smaller per OOM). The arithmetic is pure (tests/bench/test_bench_train.py)."""

from __future__ import annotations

import math
import time
from typing import Optional

from lamamba_dist.bench.common import error_kind, short_error


def add_fit_arguments(parser) -> None:
    g = parser.add_argument_group("largest micro-batch per configuration (--fit-batch)")
    g.add_argument("--fit-batch", action="store_true",
                   help="fit peak = static + per_sample x micro from two probes, verify the largest micro-batch "
                        "under the GPU memory minus the margin (10%% smaller per OOM) and report its throughput")
    g.add_argument("--fit-probes", default="16,32", help="micro-batches measured for the fit (default 16,32)")
    g.add_argument("--fit-probe-steps", type=int, default=2, help="steps per probe (the first allocates Adam state)")
    g.add_argument("--fit-verify-steps", type=int, default=2, help="timed steps at the predicted micro-batch")
    g.add_argument("--fit-margin-gib", type=float, default=8.0,
                   help="memory kept free below the GPU's total (allocator slack, CUDA context, NCCL); default 8")
    g.add_argument("--fit-multiple", type=int, default=4, help="round micro-batches down to a multiple of this")
    g.add_argument("--fit-max-batch", type=int, default=1024, help="never try more than this micro-batch")
    g.add_argument("--fit-tries", type=int, default=4, help="verification attempts (OOM -> 10%% smaller)")
    g.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory per GPU to fit into (default: the device's total)")


def fit_memory(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line ``peak = static + per_sample * micro`` through ``(micro, peak)`` points (>= 2 micros)."""
    if len({b for b, _ in points}) < 2:
        raise ValueError(f"need peaks at two different micro-batches, got {points}")
    n = len(points)
    mb = sum(b for b, _ in points) / n
    mp = sum(p for _, p in points) / n
    per = sum((b - mb) * (p - mp) for b, p in points) / sum((b - mb) ** 2 for b, _ in points)
    return mp - per * mb, per


def predict_micro_batch(static: float, per_sample: float, budget: float, multiple: int = 1,
                        max_batch: Optional[int] = None) -> int:
    """Largest micro-batch ``b`` (a multiple of ``multiple`` when possible) with ``static + per_sample * b <= budget``.

    0 when not even one sample fits; ``max_batch`` (if given) caps the answer, also when memory barely grows.
    """
    if budget < static + max(per_sample, 0.0):
        return 0
    if per_sample <= 0:
        b = max_batch if max_batch else 1 << 20
    else:
        b = int(math.floor((budget - static) / per_sample + 1e-9))
    if max_batch:
        b = min(b, max_batch)
    if multiple > 1 and b >= multiple:
        b -= b % multiple
    return max(b, 0)


def step_down(b: int, multiple: int = 1, factor: float = 0.9) -> int:
    """The next micro-batch to try after an OOM at ``b``: about ``factor * b``, a multiple of ``multiple`` when it can
    be, always smaller than ``b`` (0 when ``b`` is 1)."""
    nxt = min(int(b * factor), b - 1)
    if multiple > 1 and nxt >= multiple:
        nxt -= nxt % multiple
    return max(nxt, 0)


def fit_row(bench, path: str, combo: dict[str, str]) -> dict:
    """Largest micro-batch of one configuration on ``bench`` (lamamba_dist/bench/train.py ``BenchTrain``): probes,
    straight-line fit, verified prediction."""
    from lamamba_dist.config import ConfigError

    a = bench.args
    t_row = time.perf_counter()
    probes = sorted({int(x) for x in a.fit_probes.split(",") if x.strip()})
    try:
        if len(probes) < 2:
            raise ValueError(f"--fit-probes {a.fit_probes!r}: give at least two different micro-batches")
        cfg = bench.make_config(path, combo, micro=probes[0])
    except (ConfigError, ValueError) as e:
        return {**bench._row_base(path, combo), "fit": True, "error": short_error(e), "error_kind": "config"}
    row = bench._row_base(path, combo, cfg)
    accum = row["accum"]
    row.update(fit=True, capacity_gib=bench.capacity_gib, margin_gib=a.fit_margin_gib, probes=[], attempts=[])
    if bench.capacity_gib is None:
        row.update(error="--fit-batch needs a GPU (or --gpu-memory-gib with the fake-memory test hook)",
                   error_kind="config")
        return row

    def fail(msg: str) -> dict:
        bench._free()
        row.update(error=msg, error_kind=error_kind(msg),
                   memory_after_free_gib=bench._allocated_gib(), wall_s=time.perf_counter() - t_row)
        return row

    bench._micro = probes[0]
    row["memory_before_gib"] = bench._allocated_gib()
    err, row["build_s"] = bench._build(cfg)
    if err:
        return fail(f"build: {err}")
    for b in probes:
        bench._use_micro_batch(b)
        m = bench._measure(0, a.fit_probe_steps)
        if m.get("error"):
            return fail(f"probe at micro-batch {b}: {m['error']}")
        row["probes"].append({"micro_batch": b, "peak_gib": m["peak_gib"],
                              "img_per_s_per_gpu": b * accum * a.fit_probe_steps / m["elapsed"]})
    static, per = fit_memory([(p["micro_batch"], p["peak_gib"]) for p in row["probes"]])
    budget = bench.capacity_gib - a.fit_margin_gib
    pred = predict_micro_batch(static, per, budget, a.fit_multiple, a.fit_max_batch)
    row.update(static_gib=static, per_sample_gib=per, budget_gib=budget, predicted_micro_batch=pred)
    b = pred
    for _ in range(a.fit_tries):
        if b < 1:
            break
        if bench.trainer is None:  # rebuilt after an OOM: the old engine's state is not trusted
            bench._micro = b
            err, _ = bench._build(bench.make_config(path, combo, micro=b))
            if err:
                row["attempts"].append({"micro_batch": b, "ok": False, "error": f"build: {err}"})
                b = step_down(b, a.fit_multiple)
                continue
        bench._use_micro_batch(b)
        m = bench._measure(1, a.fit_verify_steps)
        if m.get("error"):
            row["attempts"].append({"micro_batch": b, "ok": False, "error": m["error"]})
            bench._free()
            b = step_down(b, a.fit_multiple)
            continue
        if m["peak_gib"] is not None and m["peak_gib"] > budget:  # ran, but inside the margin: not a fit
            row["attempts"].append({"micro_batch": b, "ok": False, "peak_gib": m["peak_gib"],
                                    "error": f"peak {m['peak_gib']:.2f} GiB above the budget {budget:.2f} GiB"})
            b = step_down(b, a.fit_multiple)
            continue
        row["attempts"].append({"micro_batch": b, "ok": True, "peak_gib": m["peak_gib"]})
        row.update(fit_micro_batch=b, micro_batch=b, global_batch=b * accum * bench.world,
                   steps=a.fit_verify_steps, warmup=1, **bench._throughput(m, b, accum, a.fit_verify_steps))
        if m["peak_gib"] is not None:
            row["headroom_gib"] = bench.capacity_gib - m["peak_gib"]
        break
    bench._free()
    if "fit_micro_batch" not in row:
        row.update(fit_micro_batch=None, error=f"no verified micro-batch (predicted {pred}; "
                   f"attempts {[x['micro_batch'] for x in row['attempts']]})", error_kind="fit")
    row["memory_after_free_gib"] = bench._allocated_gib()
    row["wall_s"] = time.perf_counter() - t_row
    return row
