"""Where a benchmark step's time goes, shared by the benches of this package: torch.profiler over a few steps
(host time, device busy time, kernel launches, top operators: :func:`profile_steps`) and a sampler of the main
thread's Python stack that costs far less than the profiler (:func:`host_profile`)."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def busy_time(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (overlapping ones counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def device_busy_us(events) -> float | None:
    """Microseconds during which the device ran at least one of the profiler's device events (kernels, memcpy,
    memset); None when the trace holds none."""
    from torch.autograd import DeviceType

    spans = [(e.time_range.start, e.time_range.end) for e in events
             if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return busy_time(spans) if spans else None


# Device kernels by what they do, for a step's time breakdown (docs/performance.md): the first class whose
# patterns match a kernel's name (lower-cased) takes it; the rest is "other".
KERNEL_CLASSES = (
    ("selective_scan", ("selective_scan", "scan1_", "ss2d_", "snake_scan")),
    ("depthwise_conv", ("conv_depthwise", "dwconv", "depthwise")),
    ("attention", ("fmha", "flash", "attention", "attn", "cudnn_generated_fort_native_sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "splitk", "s16816", "wgmma")),
    ("norm", ("layer_norm", "layernorm", "gammabeta", "rowwisemoments", "group_norm")),
    ("optimizer", ("adam", "multi_tensor_apply", "_ema_kernel")),
    ("inductor", ("triton_",)),
    ("gather_scatter", ("gather", "scatter", "index", "merge_cl")),
    ("copy_cast", ("copy", "memcpy", "memset", "cat_", "catarray")),
    ("elementwise_reduce", ("elementwise", "reduce", "vectorized")),
)


def kernel_class(name: str) -> str:
    """The class of a device kernel by its name (:data:`KERNEL_CLASSES`), "other" when none matches."""
    low = name.lower()
    for cls, patterns in KERNEL_CLASSES:
        if any(p in low for p in patterns):
            return cls
    return "other"


def device_ms_by_class(events, steps: int) -> dict | None:
    """Device milliseconds per step by kernel class (:func:`kernel_class`), largest first; None without device
    events."""
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for e in events:
        if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            cls = kernel_class(e.name)
            out[cls] = out.get(cls, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / steps
    return dict(sorted(out.items(), key=lambda kv: -kv[1])) if out else None


def top_kernels(events, steps: int, top: int = 80) -> list[dict] | None:
    """The ``top`` device kernels by device milliseconds per step, each with its class (:func:`kernel_class`) and
    launches per step: the kernels themselves, where ``top_device_ops`` mixes them with the operators that launch
    them. None without device events."""
    from torch.autograd import DeviceType

    ms: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in events:
        if getattr(e, "device_type", None) == DeviceType.CUDA and e.time_range.end > e.time_range.start:
            ms[e.name] = ms.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3 / steps
            calls[e.name] = calls.get(e.name, 0) + 1
    if not ms:
        return None
    return [{"kernel": name[:160], "class": kernel_class(name), "device_ms_per_step": t,
             "calls_per_step": calls[name] / steps}
            for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[:top]]


def profile_steps(step, steps: int, device: torch.device, top: int = 12) -> dict:
    """torch.profiler over ``steps`` calls of ``step()``: wall, CPU and device time per step, kernel launches,
    host syncs and copies per step, the top CPU operators (self time) and the top device kernels."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = time.perf_counter() - t0
    ev = prof.key_averages()

    def per_step(names) -> float:
        return sum(e.count for e in ev if e.key in names) / steps

    dev_time = lambda e: getattr(e, "self_device_time_total", 0)  # noqa: E731
    events = prof.events()
    busy_us = device_busy_us(events) if on_cuda else None
    return {
        "steps": steps, "wall_ms_per_step": wall * 1e3 / steps,
        "cpu_ms_per_step": sum(e.self_cpu_time_total for e in ev) / 1e3 / steps,
        "device_ms_per_step": sum(dev_time(e) for e in ev) / 1e3 / steps,
        # the time the device ran anything (kernels, copies, overlapping ones counted once) against the wall time:
        # a device idle for much of the step is waiting for the host
        "device_busy_ms_per_step": None if busy_us is None else busy_us / 1e3 / steps,
        "device_idle_fraction": None if busy_us is None else max(0.0, 1.0 - busy_us / 1e6 / wall),
        "kernel_launches_per_step": per_step(("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                              "cuLaunchKernelEx")),
        "memcpy_per_step": per_step(("cudaMemcpyAsync", "cudaMemcpy")),
        "syncs_per_step": per_step(("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")),
        # every device kernel of the profiled steps by class (scan, conv, attention, matmul, ...): where the time goes
        "device_ms_by_class": device_ms_by_class(events, steps) if on_cuda else None,
        "top_kernels": top_kernels(events, steps) if on_cuda else None,
        "top_cpu_ops": [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "calls_per_step": e.count / steps}
                        for e in sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]],
        "top_device_ops": [{"op": e.key[:120], "device_ms_per_step": dev_time(e) / 1e3 / steps,
                            "calls_per_step": e.count / steps}
                           for e in sorted(ev, key=dev_time, reverse=True)[:top] if dev_time(e) > 0],
    }


def _where(frame) -> str:
    code = frame.f_code
    parts = code.co_filename.replace("\\", "/").split("/")
    for i in range(len(parts) - 1, -1, -1):  # from the package root on: lamamba_dist/..., torch/..., deepspeed/...
        if parts[i] in ("lamamba_dist", "torch", "deepspeed", "threading.py", "queue.py", "multiprocessing"):
            parts = parts[i:]
            break
    else:
        parts = parts[-2:]
    return f"{'/'.join(parts)}:{frame.f_lineno} {code.co_name}"


def host_profile(step, steps: int, device: torch.device, top: int = 15, interval_s: float = 0.001) -> dict:
    """Where the host's wall time goes over ``steps`` calls of ``step()``, at far less cost than torch.profiler: a
    thread samples the calling thread's Python stack every ``interval_s`` (the innermost frame, and the innermost
    frame of lamamba_dist, each with its share of the samples), the other Python threads' frames likewise, the time
    spent in Python's garbage collector, the host time per ``step()`` call (percentiles), and the host syncs that
    ``torch.cuda.set_sync_debug_mode`` reports (count per step and the Python lines that caused them). A wait for the
    device shows as samples in the line that waits; host work between operators as samples spread over Python lines."""
    import sys
    import threading
    import warnings
    from collections import Counter

    main = threading.get_ident()
    leaf: Counter = Counter()
    ours: Counter = Counter()
    pair: Counter = Counter()
    other: Counter = Counter()
    samples = [0]
    stop = threading.Event()
    names = {}

    def sampler():
        me = threading.get_ident()
        while not stop.wait(interval_s):
            frames = sys._current_frames()
            f = frames.get(main)
            if f is None:
                continue
            samples[0] += 1
            g = f
            while g is not None and "lamamba_dist" not in g.f_code.co_filename:
                g = g.f_back
            a, b = _where(f), (_where(g) if g is not None else "(no lamamba_dist frame)")
            leaf[a] += 1
            ours[b] += 1
            pair[f"{b} <- {a}"] += 1
            for tid, fr in frames.items():
                if tid not in (main, me):
                    if tid not in names:
                        names.update({t.ident: t.name for t in threading.enumerate()})
                    other[f"[{names.get(tid, tid)}] {_where(fr)}"] += 1

    gc_s = [0.0]
    gc_t0 = [0.0]

    def on_gc(phase, _info):
        if phase == "start":
            gc_t0[0] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_t0[0]

    on_cuda = device.type == "cuda"
    _sync(device)
    call_s: list[float] = []
    th = threading.Thread(target=sampler, name="lamamba-host-sampler", daemon=True)
    gc.callbacks.append(on_gc)
    old_mode = torch.cuda.get_sync_debug_mode() if on_cuda else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        th.start()
        t0 = time.perf_counter()
        try:
            for _ in range(steps):
                tc = time.perf_counter()
                step()
                call_s.append(time.perf_counter() - tc)
            _sync(device)
        finally:
            wall = time.perf_counter() - t0
            stop.set()
            th.join()
            gc.callbacks.remove(on_gc)
            if on_cuda:
                torch.cuda.set_sync_debug_mode(old_mode)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where_sync = Counter(f"{Path(w.filename).name}:{w.lineno} {str(w.message)[:80]}" for w in syncs)
    n = max(samples[0], 1)
    share = lambda c: [{"where": k, "share": v / n} for k, v in c.most_common(top)]  # noqa: E731
    call_s.sort()
    pct = lambda q: call_s[min(len(call_s) - 1, int(q * len(call_s)))] * 1e3  # noqa: E731
    return {
        "steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "samples": samples[0], "interval_ms": interval_s * 1e3,
        "gc_ms_per_step": gc_s[0] * 1e3 / steps,
        "call_ms": {"p50": pct(0.5), "p90": pct(0.9), "max": call_s[-1] * 1e3, "mean": sum(call_s) * 1e3 / steps},
        "host_syncs_per_step": len(syncs) / steps, "host_sync_lines": dict(where_sync.most_common(top)),
        "main_thread_leaf": share(leaf), "main_thread_lamamba": share(ours), "main_thread_pairs": share(pair),
        "other_threads": share(other),
    }
