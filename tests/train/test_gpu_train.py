"""The trainer on the GPU: bf16 steps, and torch.compile with every scan backend in `bench`, `bench-train`, `train`.

Small models (LaMamba-debug at 32 px) so that compilation stays short; scripts/gpu_check.sh runs XL.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "debug.toml")
LAMAMBA = [sys.executable, "-m", "lamamba_dist.cli"]
# Sequence-scan backends run through SS2D's lean core; ss2d_triton changes SS2D's layout. The literal
# recurrence ("reference") is a Python loop over L: a CPU test path, not a compiled GPU one.
SCANS = ["auto", "triton", "ss2d_triton"]


def _run(args, tmp_path, timeout=900):
    import os

    # A shared compile cache when the caller gives one (scripts/gpu_check.sh does): the tests compile the same blocks.
    env = {**os.environ, "WANDB_MODE": "disabled",
           "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))}
    res = subprocess.run([*LAMAMBA, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"$ lamamba {' '.join(args)}\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


@pytest.mark.parametrize("scan", SCANS)
def test_bench_compiles_with_every_scan_backend(tmp_path, scan):
    out = tmp_path / f"bench_{scan}.json"
    _run(["bench", "--models", "LaMamba-debug", "--resolution", "32", "--batch", "8", "--steps", "2",
          "--warmup", "1", "--compile", "--scan-backend", scan, "--out", str(out)], tmp_path)
    (r,) = json.loads(out.read_text())["results"]
    assert r["compiled"] and r["scan_backend"] == scan and r["img_per_s"] > 0
    assert r["compile"]["graph_breaks"] == 0, (scan, r["compile"])


@pytest.mark.parametrize("scan", SCANS)
def test_bench_train_compiles_in_bf16_with_every_scan_backend(tmp_path, scan):
    out = tmp_path / "bench_train.json"
    _run(["bench-train", "--config", DEBUG, "--set", f'model.scan_backend="{scan}"', "--set", "train.compile=true",
          "--set", 'train.precision="bf16"', "--micro-batch", "8", "--steps", "2", "--warmup", "1", "--out", str(out)],
         tmp_path)
    (r,) = json.loads(out.read_text())["results"]
    assert "error" not in r and r["img_per_s"] > 0 and r["precision"] == "bf16", r
    assert r["final_loss"] == r["final_loss"] and r["skipped_steps"] == 0, r


def test_scan_core_as_custom_ops_compiles_in_bench_and_trainer(tmp_path):
    """``scan_core = "op"`` (ops/ss2d_core.py): compiled without a graph break, in both compile modes, with its
    memory profile; and in the trainer's compiled bf16 step."""
    out = tmp_path / "bench.json"
    models = "LaMamba-debug:compile=true:core=op,LaMamba-debug:compile=true:mode=reduce-overhead:core=op"
    _run(["bench", "--models", models,
          "--resolution", "32", "--batch", "8", "--steps", "2", "--warmup", "2", "--memory-profile", "--out", str(out)],
         tmp_path)
    rows = json.loads(out.read_text())["results"]
    assert [r["scan_core"] for r in rows] == ["op", "op"]
    for r in rows:
        assert r["img_per_s"] > 0 and r["compile"]["graph_breaks"] == 0, r["compile"]
        assert r["memory_profile"]["peak_allocated_gib"] > 0
    out = tmp_path / "bench_train.json"
    _run(["bench-train", "--config", DEBUG, "--set", 'model.scan_core="op"', "--set", "train.compile=true",
          "--set", 'train.precision="bf16"', "--micro-batch", "8", "--steps", "2", "--warmup", "1", "--out", str(out)],
         tmp_path)
    (r,) = json.loads(out.read_text())["results"]
    assert "error" not in r and r["img_per_s"] > 0 and r["final_loss"] == r["final_loss"], r


def test_cuda_graph_compile_mode_in_bench_and_trainer(tmp_path):
    """``reduce-overhead``: every block replayed as a CUDA graph, in the model bench and in the trainer with two
    micro-batches per step (each marked as a new step for the graph trees: models/compile.py)."""
    out = tmp_path / "bench.json"
    _run(["bench", "--models", "DiT-debug/2,LaMamba-debug", "--resolution", "32", "--batch", "8", "--steps", "3",
          "--warmup", "2", "--compile", "--compile-mode", "reduce-overhead", "--out", str(out)], tmp_path)
    rows = json.loads(out.read_text())["results"]
    assert [r["compile_mode"] for r in rows] == ["reduce-overhead"] * 2
    assert all(r["compile"]["graph_breaks"] == 0 and r["final_loss"] == r["final_loss"] for r in rows), rows
    out = tmp_path / "bench_train.json"
    _run(["bench-train", "--config", DEBUG, "--set", "train.compile=true", "--set", 'train.compile_mode="reduce-overhead"',
          "--set", 'train.precision="bf16"', "--accum", "2", "--micro-batch", "8", "--steps", "3",
          "--warmup", "2", "--out", str(out)], tmp_path)
    (r,) = json.loads(out.read_text())["results"]
    assert "error" not in r and r["accum"] == 2 and r["skipped_steps"] == 0 and r["final_loss"] == r["final_loss"], r


@pytest.mark.parametrize("zero", [2])
def test_train_bf16_compiled_on_gpu_saves_and_resumes(tmp_path, zero):
    """`lamamba train` in bf16, compiled with the default scan, a save, a resume (the ZeRO 0-3 matrix on XL is
    scripts/gpu_check.sh's and the README's table)."""
    sets = ["--set", f'checkpoint.dir="{tmp_path / "run"}"', "--set", 'train.precision="bf16"', "--set",
            f"train.zero_stage={zero}", "--set", f"train.compile={'true' if zero < 3 else 'false'}", "--set",
            "train.log_every=1", "--set", "checkpoint.every=3"]
    _run(["train", "--config", DEBUG, "--set", "train.steps=3", *sets], tmp_path)
    res = _run(["train", "--config", DEBUG, "--set", "train.steps=5", *sets], tmp_path)
    assert "resumed from" in res.stderr and "step_00000003" in res.stderr, res.stderr[-3000:]
    recs = [json.loads(l) for l in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("loss") is not None]
    assert len(losses) == 5 and all(l == l for l in losses), recs
    assert all(r.get("grad_norm") is not None and r["grad_norm"] > 0 for r in recs if "loss" in r), recs


def test_background_saves_and_sample_grids_in_bf16_on_gpu(tmp_path):
    """The GPU side of checkpointing.py and watch.py: periodic saves snapshot to pinned memory and publish in the
    background, the final one synchronously; grids are sampled from the EMA in bf16; a rerun resumes from the last
    checkpoint."""
    run = tmp_path / "run"
    sets = ["--set", f'checkpoint.dir="{run}"', "--set", 'train.precision="bf16"', "--set", "train.log_every=1",
            "--set", "checkpoint.every=2", "--set", "checkpoint.keep=5", "--set", "train.sample_every=3",
            "--set", "train.sample_steps=4"]
    _run(["train", "--config", DEBUG, "--set", "train.steps=6", *sets], tmp_path)
    recs = [json.loads(l) for l in (run / "stats.jsonl").read_text().splitlines()]
    saves = [(r["step"], r["background"]) for r in recs if r.get("event") == "checkpoint"]
    assert saves == [(2, True), (4, True), (6, False)], saves
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000003.png", "step_00000006.png"]
    from lamamba_dist.train import checkpoint as ckpt

    assert all(ckpt.verify_checkpoint(run / f"step_{s:08d}") is None for s in (2, 4, 6))
    res = _run(["train", "--config", DEBUG, "--set", "train.steps=7", *sets], tmp_path)
    assert "resumed from" in res.stderr and "step_00000006" in res.stderr, res.stderr[-3000:]


def test_trainer_step_has_one_host_sync(tmp_path, monkeypatch):
    """A settled step waits for the device at most once, in the fused check (nonfinite.py), after the optimizer
    step has been queued (ZeRO-2 with fused AdamW skips a non-finite step on the device); a step settled during
    the next one (the loop's steady state, trainer.py queue_step) the same. torch.cuda.set_sync_debug_mode
    counts them."""
    import os
    import warnings

    os.environ.setdefault("WANDB_MODE", "disabled")
    from lamamba_dist.config import load_config
    from lamamba_dist.train.trainer import Trainer

    cfg = load_config(DEBUG, ['data.shards="synthetic"', f'checkpoint.dir="{tmp_path}"', 'train.precision="bf16"',
                              "train.global_batch=8", "train.micro_batch=8", "data.num_workers=2",
                              "train.deterministic=false"])
    tr = Trainer(cfg, resume=False)

    def syncs_of(fn) -> list[str]:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        # (torch also warns once that the debug mode is a prototype: not a sync)
        return [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "called a synchronizing" in str(w.message)]

    try:
        assert tr.grads is not None  # ZeRO-2: the fused gradient reduction (ds_internals.py)
        it = iter(tr.loader)
        for _ in range(3):
            tr.train_step(it)
        syncs = syncs_of(lambda: tr.train_step(it))
        assert len(syncs) <= 1 and all("nonfinite.py" in x for x in syncs), syncs
        tr.queue_step(it, defer=True)
        syncs = syncs_of(lambda: tr.queue_step(it, defer=True))  # settles the previous step
        assert len(syncs) <= 1 and all("nonfinite.py" in x for x in syncs), syncs
        assert [r["applied"] for r in tr.settle()] == [True]
        assert tr.guard.skips_on_device
    finally:
        tr.close()


def test_ema_on_its_own_stream_gives_the_same_bits(tmp_path):
    """``[optim] ema_overlap``: the EMA update on its own stream (train/ema.py) beside the next step's forward and
    backward gives the EMA of the same-stream update bit for bit, with the loop's deferred settling, and adds
    no host sync."""
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    from lamamba_dist.config import load_config
    from lamamba_dist.train.trainer import Trainer

    def run(overlap: bool):
        cfg = load_config(DEBUG, ['data.shards="synthetic"', f'checkpoint.dir="{tmp_path / str(overlap)}"',
                                  'train.precision="bf16"', 'model.name="DiT-debug/2"', "train.global_batch=8",
                                  "train.micro_batch=8", "data.num_workers=1", "train.deterministic=true",
                                  "optim.ema_decay=0.9", f"optim.ema_overlap={'true' if overlap else 'false'}"])
        tr = Trainer(cfg, resume=False)
        it = iter(tr.loader)
        try:
            assert tr.ema.overlapped == overlap
            for _ in range(6):
                tr.step += len(tr.queue_step(it, defer=True))
            tr.step += len(tr.settle())
            assert tr.step == 6
            master = tr.ema.full_master_weights(dst=None)
            return master, tr.ema.full_state_dict(dst=None)
        finally:
            it.close()
            tr.close()

    try:
        master_a, ema_a = run(False)
        master_b, ema_b = run(True)
    finally:  # the trainer's deterministic mode is process-wide: leave the worker as other tests expect it
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert all(torch.equal(master_a[n], master_b[n]) for n in master_a), "the runs' weights differ: not comparable"
    differ = [n for n in ema_a if not torch.equal(ema_a[n], ema_b[n])]
    assert not differ, differ[:5]
    assert any(not torch.equal(ema_a[n], master_a[n]) for n in ema_a)  # the EMA is not just the weights
