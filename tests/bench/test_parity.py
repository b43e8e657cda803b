"""`lamamba parity`: loss curves of the fast vs the reference kernels on fixed data."""

import json

import pytest
import torch

from lamamba_dist.cli import main as cli_main
from lamamba_dist.parity import compare, relative_gap, run_parity, smooth, train_curve


def test_smooth_and_gap():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    a = [1.0] * 10
    assert relative_gap(a, a, 3) == 0.0
    assert relative_gap([1.1] * 10, a, 3) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="different or zero length"):
        relative_gap(a, a[:5], 3)


def test_compare_flags_a_gap_larger_than_the_run_to_run_noise():
    g = torch.Generator().manual_seed(0)
    base = [1.0 - 0.002 * i for i in range(100)]
    wiggle = [v + 0.05 * float(torch.randn((), generator=g)) for v in base]
    other = [v + 0.05 * float(torch.randn((), generator=g)) for v in base]
    assert compare(wiggle, wiggle, other, 10)["within_noise"]
    drifted = [v * 1.3 for v in wiggle]  # a kernel that trains differently
    res = compare(drifted, wiggle, [v * 1.3 for v in other], 10)
    assert not res["within_noise"] and res["gap_fast_vs_reference"] > res["gap_fast_vs_noise_run"]


def test_train_curve_depends_only_on_its_seeds():
    kw = dict(model_name="LaMamba-debug", resolution=32, batch=2, steps=3, device=torch.device("cpu"),
              precision="fp32", scan_backend="auto", attn_backend="auto", init_seed=0)
    a = train_curve(draw_seed=1, **kw)
    assert a == train_curve(draw_seed=1, **kw)
    assert a != train_curve(draw_seed=2, **kw)


def test_parity_cli_fast_vs_reference_on_cpu(tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = cli_main(["parity", "--model", "LaMamba-debug", "--resolution", "32", "--batch", "4", "--steps", "40",
                   "--window", "10", "--lr", "1e-3", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["within_noise"], data
    assert {k: len(v) for k, v in data["curves"].items()} == {"fast": 40, "reference": 40, "noise": 40}
    assert data["fast_backends"] == ["auto", "auto", "auto"]
    assert data["reference_backends"] == ["reference", "reference", "torch"]
    assert data["loss_last"] < data["loss_first"]  # the fixed data is learnable
    assert "within noise" in capsys.readouterr().out


def test_parity_cli_rejects_bad_arguments(capsys):
    assert cli_main(["parity", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_fast_path_trains_like_the_reference_for_200_steps_on_gpu(precision):
    res = run_parity("LaMamba-debug", 128, 16, 200, device="cuda", precision=precision)
    print({k: v for k, v in res.items() if k != "curves"})
    assert res["within_noise"], res
    assert res["loss_last"] < res["loss_first"]
