"""What is live on the GPU at the peak of a training step, and where it was allocated.

``lamamba bench --memory-profile`` runs one more step with the CUDA caching allocator recording its history
(``torch.cuda.memory._record_memory_history``, Python stacks), takes the snapshot and replays the device's trace:
every ``alloc`` adds a block, its ``free_requested`` (or a ``free_completed`` without one) removes it, and the
moment with the most live bytes is the step's peak. The blocks live at that moment are grouped by allocation
site, so that a peak above another model's can be traced to the tensors that make it.

A site is the innermost frame outside the torch package (Inductor's generated code counts as outside: its files
live in the compile cache), with its source line when the file is readable (for generated code, the
``empty_strided_cuda((64, 4, 640, 1024), ...)`` line that names the buffer's shape), and the innermost frame of
lamamba_dist's models, which says which block's forward or backward it belongs to. Memory allocated before the
recording started (weights, gradients, optimizer state, the compile's CUDA-graph pools) is reported as one sum.
"""

from __future__ import annotations

import linecache
import os

import torch

GIB = 2 ** 30
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _frames(event: dict) -> list[dict]:
    return event.get("frames") or []


def _site(frames: list[dict]) -> tuple[str, str, str]:
    """(site, its source line, the innermost models frame) of an allocation's stack (innermost first)."""
    site = code = model = ""
    for f in frames:
        name = f.get("filename", "")
        if not site and name and not name.startswith(_TORCH_DIR) and not name.startswith("<"):
            site = f"{name}:{f.get('line', 0)} {f.get('name', '')}"
            code = linecache.getline(name, int(f.get("line", 0) or 0)).strip()
        if not model and f"lamamba_dist{os.sep}models{os.sep}" in name:
            model = f"{os.path.basename(name)}:{f.get('line', 0)} {f.get('name', '')}"
        if site and model:
            break
    return site or "(no Python frame: allocated by C++ code, e.g. the autograd engine)", code, model


def peak_live_allocations(trace: list[dict], top: int = 15) -> dict:
    """Replay one device's allocator trace (``snapshot["device_traces"][i]``): the most bytes live at once (counting
    from the trace's start) and the blocks live at that moment, grouped by allocation site (largest first)."""
    def replay(stop: int):
        """Live blocks after event ``stop`` (all events when -1 ... len), and the running peak on the way."""
        live: dict[int, dict] = {}
        cur = peak = 0
        peak_index = -1
        for i, e in enumerate(trace):
            if 0 <= stop < i:
                break
            action = e.get("action")
            if action == "alloc":
                live[e["addr"]] = e
                cur += int(e["size"])
                if cur > peak:
                    peak, peak_index = cur, i
            elif action in ("free_requested", "free_completed"):
                block = live.pop(e["addr"], None)  # the first of the two for a block counts, as memory_allocated does
                if block is not None:
                    cur -= int(block["size"])
        return live, peak, peak_index

    _, peak, peak_index = replay(-1)
    at_peak = list(replay(peak_index)[0].values()) if peak_index >= 0 else []
    groups: dict[tuple, dict] = {}
    for e in at_peak:
        site, code, model = _site(_frames(e))
        g = groups.setdefault((site, model), {"site": site, "code": code, "model_frame": model, "bytes": 0,
                                              "count": 0, "sizes": {}})
        g["bytes"] += int(e["size"])
        g["count"] += 1
        g["sizes"][int(e["size"])] = g["sizes"].get(int(e["size"]), 0) + 1
    rows = sorted(groups.values(), key=lambda g: -g["bytes"])
    out = []
    for g in rows[:top]:
        largest = sorted(g.pop("sizes").items(), key=lambda kv: -kv[0])[:3]
        out.append({**g, "gib": g.pop("bytes") / GIB, "largest_blocks_mib": [(s / 2 ** 20, n) for s, n in largest]})
    rest = rows[top:]
    return {"peak_gib": peak / GIB, "events": len(trace), "peak_event": peak_index, "live_blocks_at_peak": len(at_peak),
            "sites": out, "other_sites_gib": sum(g["bytes"] for g in rest) / GIB, "other_sites": len(rest)}


def require_cuda(device: torch.device) -> None:
    """The memory profile's precondition, checked before a bench builds anything."""
    if device.type != "cuda":
        raise ValueError(f"the memory profile reads the CUDA caching allocator's history; device is {device.type}")


def memory_profile(step, device: torch.device, top: int = 15, max_entries: int = 2_000_000) -> dict:
    """One ``step()`` with the allocator's history recorded: the peak, what was allocated before the step, and
    :func:`peak_live_allocations` of the step's trace. CUDA only."""
    require_cuda(device)
    mem = torch.cuda.memory
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    mem._record_memory_history(enabled="all", context="all", stacks="python", max_entries=max_entries,
                               device=device)
    try:
        step()
        torch.cuda.synchronize(device)
        snap = mem._snapshot(device)
    finally:
        mem._record_memory_history(enabled=None, device=device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    traces = snap.get("device_traces") or []
    trace = traces[idx] if idx < len(traces) else []
    res = peak_live_allocations(trace, top)
    res["allocated_before_step_gib"] = before / GIB
    res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB  # the allocator's own count
    res["replayed_peak_gib"] = res["allocated_before_step_gib"] + res.pop("peak_gib")
    res["trace_truncated"] = len(trace) >= max_entries
    return res
