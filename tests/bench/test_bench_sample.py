"""`lamamba bench-sample` on CPU with debug models and tiny steps."""

from __future__ import annotations

import json

from lamamba_dist.cli import main


def test_bench_sample_two_models_one_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench-sample", "--models", "LaMamba-debug,DiT-debug/2", "--resolution", "32", "--batch", "2",
               "--steps", "3", "--warmup-steps", "1", "--cfg-scale", "1.5", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["results"]] == ["LaMamba-debug", "DiT-debug/2"]
    first, second = res["results"]
    assert first["ratio_to_first"] == 1.0
    assert second["ratio_to_first"] == second["images_per_s"] / first["images_per_s"]
    for r in res["results"]:
        assert r["images_per_s"] > 0 and r["finite"] and r["params"] > 0 and r["resolution"] == 32
        assert r["gmacs_per_forward"] > 0
    assert res["steps"] == 3 and res["batch"] == 2 and res["cfg_scale"] == 1.5
    assert "wrote" in capsys.readouterr().out


def test_bench_sample_errors(tmp_path, capsys):
    assert main(["bench-sample", "--models", "LaMamba-debug,Nope", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown model(s) Nope" in capsys.readouterr().err
    assert main(["bench-sample", "--models", "LaMamba-debug", "--cfg-scale", "0.5", "--out", str(tmp_path / "x.json")]) == 2
    assert "--cfg-scale 0.5" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
