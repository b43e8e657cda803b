"""`lamamba bench-train` (the trainer's real step for a matrix of configurations in one launch), its --fit-batch
arithmetic, `lamamba bench scaling` (lamamba_dist/bench/scaling.py), and config-only models through ``[model] arch_overrides`` (LaMamba-XXL)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from train_helpers import DEBUG_CONFIG, ROOT, step_dir, train_env

from lamamba_dist.bench.fit import fit_memory, predict_micro_batch, step_down
from lamamba_dist.bench.matrix import expand, parse_matrix


def _bench(tmp_path, nproc: int, args: list, env: dict | None = None, timeout: int = 240):
    out = tmp_path / "bench.json"
    launcher = [sys.executable, "-m", "lamamba_dist.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lamamba_dist.cli"]
    cmd = launcher + ["bench-train", "--config", str(DEBUG_CONFIG), "--out", str(out), *args]
    res = subprocess.run(cmd, cwd=ROOT, env=train_env(env), capture_output=True, text=True, timeout=timeout)
    log = f"$ {' '.join(cmd)}\n--- rc {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}"
    assert res.returncode == 0, log
    return json.loads(out.read_text()), res.stdout, log


# --------------------------------------------------------------------------- the sweep, 2 ranks


def test_two_rank_sweep_reports_every_row_and_survives_failures(tmp_path):
    """zero x gc on 2 gloo ranks, 2 timed steps each; row 1 hits a planted OOM on both ranks, the last row an
    impossible setting (compile with ZeRO-3): both become error rows, every other row is measured."""
    fault = {"LAMAMBA_FAULT": "bench_oom:1:0,bench_oom:1:1"}
    data, stdout, log = _bench(tmp_path, 2, ["--matrix", "zero=1,2;gc=false,true", "--matrix", "zero=3;train.compile=true",
                                             "--steps", "2", "--warmup", "1"], env=fault)
    env, rows = data["environment"], data["results"]
    assert env["world_size"] == 2 and env["deepspeed"] and env["torch"], env
    assert len(rows) == 5, log
    assert [(r["zero_stage"], r["grad_checkpointing"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True), (3, False)]
    assert all(r["world_size"] == 2 for r in rows)
    for i in (0, 2, 3):
        r = rows[i]
        assert "error" not in r, r
        assert r["img_per_s"] > 0 and r["img_per_s_per_gpu"] > 0 and r["step_ms"] > 0, r
        assert math.isclose(r["img_per_s"], 2 * r["img_per_s_per_gpu"])
        assert r["micro_batch"] == 2 and r["global_batch"] == 4 and r["accum"] == 1  # debug micro, 1 step of 2 x 2
        assert math.isfinite(r["final_loss"]) and r["skipped_steps"] == 0
        assert r["model"] == "LaMamba-debug" and r["params"] > 0 and r["model_tflops_per_gpu"] > 0
    assert rows[1]["error_kind"] == "oom" and "planted OOM" in rows[1]["error"], rows[1]
    assert rows[4]["error_kind"] == "error" and "compile = true is not supported" in rows[4]["error"], rows[4]
    lines = [l for l in stdout.splitlines() if l.startswith("[bench-train] LaMamba-debug")]
    assert len(lines) == 5 and "ERROR" in lines[1] and "img/s/GPU" in lines[0], stdout


# --------------------------------------------------------------------------- --fit-batch


def test_fit_batch_predicts_verifies_and_steps_down(tmp_path):
    """Fake memory model 1 + 0.5 b + 0.02 b^2 GiB on a 12 GiB 'GPU', margin 1: the line through the probes (2, 4)
    predicts 16; 16 runs out of memory, 14 runs but eats the margin, 12 is the answer."""
    data, _, log = _bench(tmp_path, 1, ["--matrix", "zero=2", "--fit-batch", "--fit-probes", "2,4",
                                        "--gpu-memory-gib", "12", "--fit-margin-gib", "1", "--fit-multiple", "2"],
                          env={"LAMAMBA_BENCH_FAKE_MEMORY": "1,0.5,0.02"})
    (r,) = data["results"]
    assert r["fit"] and "error" not in r, log
    assert [p["micro_batch"] for p in r["probes"]] == [2, 4]
    assert math.isclose(r["static_gib"], 0.84) and math.isclose(r["per_sample_gib"], 0.62)
    assert r["predicted_micro_batch"] == 16
    assert [(a["micro_batch"], a["ok"]) for a in r["attempts"]] == [(16, False), (14, False), (12, True)]
    assert "OutOfMemoryError" in r["attempts"][0]["error"] and "above the budget" in r["attempts"][1]["error"]
    assert r["fit_micro_batch"] == 12 and r["micro_batch"] == 12 and r["img_per_s_per_gpu"] > 0
    assert math.isclose(r["peak_gib"], 1 + 6 + 0.02 * 144)


def test_fit_arithmetic():
    static, per = fit_memory([(16, 20.0), (32, 28.0)])
    assert math.isclose(static, 12.0) and math.isclose(per, 0.5)
    static, per = fit_memory([(8, 16.1), (16, 19.9), (32, 28.0)])  # least squares through three points
    assert abs(per - 0.4964) < 1e-3 and abs(static - 12.07) < 0.05
    with pytest.raises(ValueError):
        fit_memory([(16, 20.0), (16, 21.0)])
    # 12 + 0.5 b <= 131.4 (140 GiB GPU - 8.6 margin): b = 238 -> 236 as a multiple of 4
    assert predict_micro_batch(12.0, 0.5, 131.4) == 238
    assert predict_micro_batch(12.0, 0.5, 131.4, multiple=4) == 236
    assert predict_micro_batch(12.0, 0.5, 131.4, multiple=4, max_batch=128) == 128
    assert predict_micro_batch(12.0, 0.5, 12.5) == 1 and predict_micro_batch(12.0, 0.5, 12.4) == 0
    assert predict_micro_batch(12.0, 0.0, 100.0, max_batch=512) == 512  # memory does not grow: the cap decides
    assert predict_micro_batch(12.0, 0.5, 12.0 + 0.5 * 3) == 3  # exact boundary fits
    seq = [236]
    while seq[-1] > 0:
        seq.append(step_down(seq[-1], multiple=4))
    assert seq[:4] == [236, 212, 188, 168] and all(b > c for b, c in zip(seq, seq[1:])) and seq[-1] == 0


def test_matrix_parsing_and_row_order():
    assert parse_matrix("zero=1,2;gc=false,true") == [
        {"zero": "1", "gc": "false"}, {"zero": "1", "gc": "true"}, {"zero": "2", "gc": "false"}, {"zero": "2", "gc": "true"}]
    assert parse_matrix("") == [{}]
    assert parse_matrix("train.compile=true") == [{"train.compile": "true"}]
    for bad in ("zero", "zero=", "bogus=1", "zero=1;zero=2"):
        with pytest.raises(ValueError):
            parse_matrix(bad)
    rows = expand(["a.toml", "b.toml"], ["zero=1,2", "config=c.toml;micro=8"])
    assert rows == [("a.toml", {"zero": "1"}), ("a.toml", {"zero": "2"}), ("b.toml", {"zero": "1"}),
                    ("b.toml", {"zero": "2"}), ("c.toml", {"micro": "8"})]
    assert expand(["a.toml"], []) == [("a.toml", {})]
    with pytest.raises(ValueError):
        expand([], ["zero=1"])


def test_help_and_lazy_imports():
    from lamamba_dist.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench-train", "--help"])
    assert e.value.code == 0
    code = "import sys, lamamba_dist.bench.train; assert 'deepspeed' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --------------------------------------------------------------------------- lamamba bench scaling


def _scaling_table():
    from lamamba_dist.bench import scaling

    return scaling


def _row(world, ips, zero=2, gc=False, **kw):
    return {"config": "lamamba_XL_256", "model": "LaMamba-XL", "resolution": 256, "zero_stage": zero,
            "grad_checkpointing": gc, "micro_batch": 32, "accum": 1, "world_size": world,
            "img_per_s_per_gpu": ips, "img_per_s": ips * world, "step_ms": 32 / ips * 1e3, "peak_gib": 40.0,
            "mfu": 0.2, **kw}


def test_scaling_table_from_synthetic_json(tmp_path):
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "deepspeed": "0.19.8", "command": "python3 -m lamamba_dist.cli bench-train ..."}
    oom = {**_row(1, 1.0, zero=3), "error": "OutOfMemoryError: CUDA out of memory", "error_kind": "oom"}
    (tmp_path / "b1.json").write_text(json.dumps({"environment": {**env, "world_size": 1}, "results": [_row(1, 200.0), oom]}))
    (tmp_path / "b2.json").write_text(json.dumps({"environment": {**env, "world_size": 2}, "results": [_row(2, 180.0)]}))
    fit = {**_row(1, 210.0), "fit": True, "fit_micro_batch": 236, "predicted_micro_batch": 240, "static_gib": 12.0,
           "per_sample_gib": 0.5, "micro_batch": 236}
    (tmp_path / "f1.json").write_text(json.dumps({"environment": {**env, "world_size": 1}, "results": [fit]}))
    elastic = {"what": "elastic", "loss_after_resume": [{"step": 51, "loss_2gpu": 0.31, "loss_1gpu_resumed": 0.3101,
                                                         "rel_diff": 3.2e-4}], "max_rel_diff": 3.2e-4,
               "resume_lines": ["resumed from x/step_00000050 (step 50, elastic 2 -> 1 ranks)"]}
    (tmp_path / "train_elastic.json").write_text(json.dumps(elastic))
    out = tmp_path / "scaling.md"
    mod = _scaling_table()
    assert mod.main([str(p) for p in sorted(tmp_path.glob("*.json"))] + ["--out", str(out)]) == 0
    md = out.read_text()
    lines = md.splitlines()

    def row(*cells):
        hits = [l for l in lines if l.startswith("| " + " | ".join(cells) + " |")]
        assert len(hits) == 1, (cells, hits)
        return hits[0]

    assert "| 200.0 | 200.0 | 1.00 |" in row("LaMamba-XL", "256", "2", "off", "32", "1")
    assert "| 180.0 | 360.0 | 0.90 |" in row("LaMamba-XL", "256", "2", "off", "32", "2")  # 180 / 200
    assert "not measured" in row("LaMamba-XL", "256", "2", "off", "32", "4")
    assert "OOM" in row("LaMamba-XL", "256", "3", "off", "32", "1")
    assert "not measured" in row("DiT-XL/2", "256", "2", "off", "32", "1")  # planned, not in the files
    assert "| 236 | 240 | 12.0 | 0.500 |" in row("LaMamba-XL", "256", "2", "off", "1")
    assert "not measured" in row("LaMamba-XL[base_width=384,num_heads=16]", "256", "3", "off", "2")
    assert "| 51 | 0.31000 | 0.31010 | 3.20e-04 |" in md and "elastic 2 -> 1 ranks" in md
    assert "bash scripts/gpu_scaling.sh" in md and "NVIDIA H200" in md
    empty = tmp_path / "empty.md"
    mod.main(["--out", str(empty)])
    assert "not measured" in empty.read_text() and "| 1.00 |" not in empty.read_text()


# --------------------------------------------------------------------------- config-only models


def test_xxl_config_is_a_wider_xl():
    from lamamba_dist.config import load_config
    from lamamba_dist.flops import model_stats
    from lamamba_dist.train.dryrun import dry_run

    cfg = load_config(ROOT / "configs" / "lamamba_XXL_256.toml")
    assert cfg.model.name == "LaMamba-XL" and cfg.model.arch_overrides == {"base_width": 384, "num_heads": 16}
    assert "938.7M params" in dry_run(cfg)
    xxl = model_stats("LaMamba-XL", 256, arch_overrides=cfg.model.arch_overrides)
    xl = model_stats("LaMamba-XL", 256)
    assert xxl["params"] == 938_654_696 and xxl["gmacs"] > 1.4 * xl["gmacs"]


def test_unknown_arch_override_is_a_clear_error(capsys):
    from lamamba_dist.cli import main

    assert main(["train", "--config", str(DEBUG_CONFIG), "--dry-run", "--set", "model.arch_overrides.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_arch_overrides_reach_checkpoints_export_and_sampling(tmp_path):
    """A config-only width trains, and its checkpoint and exported weights rebuild the same model."""
    cmd = [sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG), "--set", f'checkpoint.dir="{tmp_path}"',
           "--set", "train.steps=2", "--set", "checkpoint.every=2", "--set", "model.arch_overrides.base_width=48"]
    res = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    state = json.loads((step_dir(tmp_path, 2) / "trainer_state.json").read_text())
    assert state["model"]["arch_overrides"] == {"base_width": 48}
    import torch

    from lamamba_dist.models import create_model
    from lamamba_dist.sample import load_sampling_model
    from lamamba_dist.models import build_from_weights

    want = sum(p.numel() for p in create_model("LaMamba-debug", resolution=32, num_classes=10, base_width=48).parameters())
    model, meta = build_from_weights(step_dir(tmp_path, 2) / "ema.safetensors")
    assert meta["arch_overrides"] == {"base_width": 48} and sum(p.numel() for p in model.parameters()) == want
    model, _, _ = load_sampling_model(None, str(tmp_path), None, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == want
