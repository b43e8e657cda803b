"""`lamamba bench kernels` (lamamba_dist/bench/kernels.py): the JSON rows on tiny shapes under Triton's interpreter
on CPU, the refusal without it, and the real run on a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_helpers import needs_triton

ROOT = Path(__file__).resolve().parents[2]
LAMAMBA = [sys.executable, "-m", "lamamba_dist.cli"]


def _bench(args, tmp_path, interpret: bool):
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "kernels.json"
    res = subprocess.run([*LAMAMBA, "bench", "kernels", *args, "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    return res, (json.loads(out.read_text()) if out.is_file() else None)


@needs_triton
def test_scan_and_ss2d_rows_under_the_interpreter(tmp_path):
    res, out = _bench(["--device", "cpu", "--shapes", "2x8x16"], tmp_path, interpret=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out["bench"] == "kernels" and out["environment"]["interpreter"] is True
    (row,) = out["results"]  # no mamba-ssm kernel on a CPU: the Triton backend alone
    assert row["kernel"] == "selective_scan" and row["shape"] == [2, 8, 16] and row["backend"] == "triton"
    assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["fwd_gb_per_s"] > 0

    res, out = _bench(["--what", "ss2d", "--device", "cpu", "--shapes", "1x4x4"], tmp_path, interpret=True)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [(r["kernel"], r.get("path") or r.get("backend")) for r in out["results"]]
    assert rows == [("ss2d_scan", "sequence+triton"), ("ss2d_scan", "gathered"), ("ss2d_module", "triton"),
                    ("ss2d_module", "ss2d_triton")]
    # the gathered scan and the sequence path compute the same function (the kernels' parity tests hold the
    # tolerances; here the bench's own comparison must run and be small)
    assert out["results"][1]["max_rel_diff_to_sequence"] < 1e-2

    res, out = _bench(["--what", "conv", "--device", "cpu", "--shapes", "1x8x4"], tmp_path, interpret=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["kernel"], r["backend"]) for r in out["results"]] == [
        ("dwconv_silu", "torch"), ("dwconv_silu", "triton_tiles"), ("dwconv_silu", "triton")]
    for r in out["results"][1:]:  # the tiles and the rows
        assert r["max_rel_diff_to_torch"] < 2e-2  # bf16: one rounding less than PyTorch's path

    res, out = _bench(["--what", "snake", "--device", "cpu", "--shapes", "2x8x4"], tmp_path, interpret=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["kernel"], r["path"]) for r in out["results"]] == [
        ("snake_gather", "torch"), ("snake_gather", "triton"), ("snake_merge", "torch"), ("snake_merge", "triton"),
        ("snake_scan_fwd", "unfused"), ("snake_scan_bwd", "unfused"), ("snake_scan_fwd", "fused"),
        ("snake_scan_bwd", "fused")]  # the scan core at a length the fused kernels take, both ways
    assert all(r["ms"] > 0 for r in out["results"][4:])
    assert out["results"][1]["max_rel_diff_to_torch"] == 0.0  # a copy
    assert out["results"][3]["max_rel_diff_to_torch"] < 1e-2  # bf16: the kernel sums in fp32, rounds once

    res, out = _bench(["--what", "core", "--device", "cpu", "--shapes", "1x64x3"], tmp_path, interpret=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["kernel"], r["rank"], r["padded_rank"]) for r in out["results"]] == [("ss2d_core", 2, 8),
                                                                                  ("ss2d_core", 2, 2)]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in out["results"])
    assert out["results"][1]["max_rel_diff_to_padded"] < 2e-2  # the zeros change no sum; bf16 GEMM orders may

    res, out = _bench(["--what", "attn", "--device", "cpu", "--shapes", "2x32x8", "--sweep"], tmp_path,
                      interpret=True)
    assert res.returncode == 0, res.stderr[-3000:]
    main = [r for r in out["results"] if "backend" in r]
    assert [(r["kernel"], r["backend"], r["heads"], r["window"]) for r in main] == [
        ("window_attention", "sdpa", 16, 8), ("window_attention", "triton", 16, 8),
        ("window_attention", "triton_tokens", 16, 8)]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in main)
    assert main[1]["max_rel_diff_to_sdpa"] < 3e-2  # bf16 roundings in different places
    sweep = [(r["kernel"], r["config"]) for r in out["results"] if "config" in r]
    assert ("window_attention_fwd", [8]) in sweep and ("window_attention_bwd", [4, 2048]) in sweep
    assert all("ms" in r for r in out["results"] if "config" in r)


@needs_triton
def test_cpu_without_the_interpreter_and_bad_shapes_are_refused(tmp_path):
    res, out = _bench(["--device", "cpu"], tmp_path, interpret=False)
    assert res.returncode == 2 and "TRITON_INTERPRET=1" in res.stderr and out is None
    res, out = _bench(["--device", "cpu", "--shapes", "2x8"], tmp_path, interpret=True)
    assert res.returncode == 2 and "--shapes '2x8'" in res.stderr and out is None


@pytest.mark.gpu
@pytest.mark.parametrize("what,shapes", [("scan", "4x256x1024"), ("ss2d", "4x64x16"), ("conv", "4x640x32"),
                                         ("core", "4x640x32"), ("attn", "4x320x32")])
def test_kernels_bench_on_gpu(tmp_path, what, shapes):
    res, out = _bench(["--what", what, "--shapes", shapes, "--device", "cuda"], tmp_path, interpret=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out["environment"]["device"] == "cuda" and out["results"]
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] >= r["fwd_ms"] * 0.5 for r in out["results"])
    if out["environment"]["fused_scan"] and what == "scan":
        assert {r["backend"] for r in out["results"]} == {"triton", "fused"}
        assert out["results"][-1]["max_rel_diff_to_triton"] < 5e-2


@pytest.mark.gpu
def test_snake_bench_on_gpu(tmp_path):
    res, out = _bench(["--what", "snake", "--shapes", "4x640x32", "--device", "cuda"], tmp_path, interpret=False)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = {(r["kernel"], r["path"]) for r in out["results"]}
    assert paths == {(k, p) for k in ("snake_gather", "snake_merge") for p in ("torch", "torch_compiled", "triton")}
    assert all(r["ms"] > 0 and r["max_rel_diff_to_torch"] < 1e-2 for r in out["results"])
