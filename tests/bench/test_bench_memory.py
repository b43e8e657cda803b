"""`lamamba bench --memory-profile` (lamamba_dist/bench/memory.py): what is live at a step's peak, by site.

On CPU the trace replay runs on hand-written allocator traces (the format of torch.cuda.memory._snapshot()'s
``device_traces``); on the GPU (``-m gpu``) a real bench row carries the profile and its replayed peak agrees with
the allocator's own count.
"""

import os

import pytest
import torch

from lamamba_dist.bench.memory import peak_live_allocations
from lamamba_dist.cli import main as cli_main

MIB = 2 ** 20
TORCH_FILE = os.path.join(os.path.dirname(torch.__file__), "nn", "functional.py")


def _alloc(addr, mib, frames):
    return {"action": "alloc", "addr": addr, "size": mib * MIB, "frames": frames}


def _free(addr, mib, action="free_requested"):
    return {"action": action, "addr": addr, "size": mib * MIB, "frames": []}


def test_replay_finds_the_peak_and_groups_what_is_live_there(tmp_path):
    gen = tmp_path / "cgenerated.py"  # stands for a file of Inductor's generated code
    gen.write_text("def call(args):\n    buf0 = empty_strided_cuda((64, 4, 640, 1024), (1, 1, 1, 1), torch.bfloat16)\n")
    model = os.path.join("/x", "lamamba_dist", "models", "lamamba.py")
    in_block = [{"filename": TORCH_FILE, "line": 1, "name": "linear"},  # torch's frames are skipped for the site
                {"filename": str(gen), "line": 2, "name": "call"},
                {"filename": model, "line": 120, "name": "forward"}]
    other = [{"filename": "/y/train/step.py", "line": 7, "name": "loss"}]
    trace = [
        _alloc(1, 100, in_block),
        _alloc(2, 50, other),
        _free(2, 50),
        _free(2, 50, "free_completed"),  # the completion of a requested free counts once
        _alloc(3, 200, in_block),
        _alloc(4, 30, []),  # no Python frame (the autograd engine's allocations)
        _free(1, 100, "free_completed"),  # a completion without a request frees too
        _alloc(5, 60, other),  # 290 live: below the peak of 330
        {"action": "segment_alloc", "addr": 99, "size": 10 ** 9},  # segments are not allocations
    ]
    res = peak_live_allocations(trace)
    assert res["peak_gib"] == pytest.approx(330 * MIB / 2 ** 30)
    assert res["peak_event"] == 5 and res["live_blocks_at_peak"] == 3
    sites = res["sites"]
    assert [round(s["gib"] * 1024) for s in sites] == [300, 30]
    top = sites[0]
    assert top["site"] == f"{gen}:2 call" and top["count"] == 2
    assert top["code"].startswith("buf0 = empty_strided_cuda((64, 4, 640, 1024)")
    assert top["model_frame"] == "lamamba.py:120 forward"
    assert top["largest_blocks_mib"] == [(200.0, 1), (100.0, 1)]
    assert sites[1]["site"].startswith("(no Python frame") and sites[1]["model_frame"] == ""
    # fewer sites than there are: the rest is one sum
    res1 = peak_live_allocations(trace, top=1)
    assert len(res1["sites"]) == 1 and res1["other_sites"] == 1
    assert res1["other_sites_gib"] == pytest.approx(30 * MIB / 2 ** 30)
    assert peak_live_allocations([])["peak_gib"] == 0 and peak_live_allocations([])["sites"] == []


def test_memory_profile_off_cuda_is_a_clear_error(capsys):
    assert cli_main(["bench", "--models", "DiT-debug/2", "--resolution", "32", "--batch", "2", "--steps", "1",
                     "--device", "cpu", "--memory-profile"]) == 2
    assert "memory profile reads the CUDA caching allocator's history; device is cpu" in capsys.readouterr().err


@pytest.mark.gpu
def test_memory_profile_of_a_bench_row_on_gpu(tmp_path):
    from lamamba_dist.bench.model import run_bench

    # batch 64 at 64 px: the activations (about 200 MiB saved) outweigh the gradients and the optimizer's
    # temporaries (about 25 MiB), so the step's peak falls where the forward's tensors are live. At batch 8 they
    # are of a size, and the peak can fall in the backward or the optimizer step, whose allocations come from
    # the autograd engine's thread (no Python frames) or from torch's optimizer code.
    out = run_bench(["LaMamba-debug", "LaMamba-debug:compile=true"], 64, 64, 2, 1, memory_profile=True)
    for r in out["results"]:
        mp = r["memory_profile"]
        assert mp["sites"] and mp["live_blocks_at_peak"] > 0 and not mp["trace_truncated"]
        # the replayed peak is the allocator's (both count from the step's start, the replay by its trace)
        assert mp["replayed_peak_gib"] == pytest.approx(mp["peak_allocated_gib"], rel=0.02, abs=1e-3)
        # some memory traced to a block of the model
        assert any(s["model_frame"] for s in mp["sites"]), [(s["site"], s["gib"]) for s in mp["sites"][:5]]
