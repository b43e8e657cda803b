"""Model registry, parameter counts and shapes (docs/model.md §9-10), official parity (§10), checkpointing."""

import argparse
import subprocess
import sys
import types

import pytest
import torch

from lamamba_dist.cli import main as cli_main
from lamamba_dist.diffusion.guidance import forward_with_cfg
from lamamba_dist.models import MODELS, build_from_weights, create_model, load_state_dict_strict
from lamamba_dist.weights import load_weights, save_weights
from official_vectors import EXPECTED, TINY, official_state_dict


def meta_model(name, res=256, **kw):
    with torch.device("meta"):
        return create_model(name, resolution=res, **kw)


def n_params(m, trainable=False):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


@pytest.mark.parametrize("name,res,expected", [
    ("LaMamba-XL", 256, 652_484_648),
    ("LaMamba-XL", 512, 653_467_688),
    ("LaMamba-L", 256, 444_647_816),
    ("LaMamba-B", 256, 133_087_616),
    ("LaMamba-S", 256, 33_706_052),
    ("DiT-XL/2", 256, 675_129_632),
    ("DiT-XL/2", 512, 676_014_368),
    ("DiT-L/2", 256, 458_102_816),
    ("DiT-B/2", 256, 130_512_416),
    ("DiT-S/2", 256, 32_963_360),
])
def test_parameter_counts(name, res, expected):
    assert n_params(meta_model(name, res)) == expected


def test_dit_trainable_counts_exclude_frozen_pos_embed():
    assert n_params(meta_model("DiT-XL/2"), trainable=True) == 674_834_720
    assert n_params(meta_model("DiT-S/2"), trainable=True) == 32_865_056


def test_every_registered_size_builds_at_256_and_512():
    for name in MODELS:
        for res in (256, 512):
            m = meta_model(name, res)
            assert m.latent_size == res // 8


def test_xl_state_dict_shapes_match_official_appendix():
    sd = meta_model("LaMamba-XL").state_dict()
    assert len(sd) == 683 - 22 - 4  # official keys minus relative_position_index (22) and attn_mask (4) buffers
    expect = {
        "pos_embed": (1, 32, 32, 320),
        "patch_embed.proj.weight": (320, 4, 1, 1),
        "t_embedder.mlp.0.weight": (1280, 256),
        "y_embedder.embedding_table.weight": (1001, 1280),
        "layers.0.downsample.reduction.weight": (640, 1280),
        "layers.1.downsample.norm.weight": (2560,),
        "layers_up.2.upsample.expand.weight": (2560, 1280),
        "layers_up.3.upsample.expand.weight": (1280, 640),
        "layers_up.3.upsample.norm.weight": (320,),
        "final_up.expand.weight": (320, 320),
        "final_condition_projection.weight": (320, 1280),
        "final_adaLN_modulation.1.weight": (640, 320),
        "final_linear.weight": (8, 320),
        "layers.0.blocks.0.condition_projection.weight": (320, 1280),
        "layers.0.blocks.0.attn.relative_position_bias_table": (225, 16),
        "layers.0.blocks.0.attn.qkv.weight": (960, 320),
        "layers.0.blocks.0.op.x_proj_weight": (4, 22, 640),
        "layers.0.blocks.0.op.dt_projs_weight": (4, 640, 20),
        "layers.0.blocks.0.op.dt_projs_bias": (4, 640),
        "layers.0.blocks.0.op.A_logs": (2560, 1),
        "layers.0.blocks.0.op.Ds": (2560,),
        "layers.0.blocks.0.op.in_proj.weight": (1280, 320),
        "layers.0.blocks.0.op.conv2d.weight": (640, 1, 3, 3),
        "layers.0.blocks.0.op.out_proj.weight": (320, 640),
        "layers.0.blocks.0.adaLN_modulation.1.weight": (2880, 320),
        "layers.2.blocks.0.op.x_proj_weight": (4, 82, 2560),
        "mid_layer.blocks.1.mlp.fc1.weight": (5120, 1280),
        "layers_up.0.blocks.2.condition_projection.weight": (1280, 1280),
        "layers_up.3.blocks.2.mlp.fc2.weight": (320, 1280),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    # condition projection: absent where C == Cc in encoder/bottleneck, present in every decoder block
    assert "layers.2.blocks.0.condition_projection.weight" not in sd
    assert "mid_layer.blocks.0.condition_projection.weight" not in sd
    assert not any(k.endswith("op.conv2d.bias") or k.endswith("in_proj.bias") for k in sd)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd)


@pytest.mark.parametrize("res,shifted", [
    (256, {"layers.0.blocks.1", "layers.1.blocks.1", "layers_up.2.blocks.1", "layers_up.3.blocks.1"}),
    (512, {f"layers.{i}.blocks.1" for i in range(4)} | {"mid_layer.blocks.1"}
     | {f"layers_up.{j}.blocks.1" for j in range(4)}),
])
def test_shifted_window_blocks(res, shifted):
    m = meta_model("LaMamba-XL", res)
    got = {n[: -len(".attn")] for n, mod in m.named_modules() if n.endswith(".attn") and mod.shift}
    assert got == shifted
    for n, mod in m.named_modules():
        if n.endswith(".attn"):
            assert mod.window_size == 8 and mod.shift in (0, 4)


def _tiny_official(which):
    model = create_model("LaMamba-debug", resolution=128, num_classes=10, **TINY[which]["overrides"]).eval()
    from lamamba_dist.convert import official_to_ours

    load_state_dict_strict(model, official_to_ours(official_state_dict(which)))
    return model


def _check_outputs(model, which):
    e = EXPECTED[which]
    assert n_params(model) == e["params"]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    assert abs(x.sum().item() - 27.1335899) < 1e-4
    with torch.no_grad():
        out = model(x, torch.tensor([10, 500]), torch.tensor([1, 3]))
        x0 = x[0:1]
        cfg = forward_with_cfg(model, torch.cat([x0, x0]), torch.tensor([10, 10]), torch.tensor([1, 10]), 4.0)
    assert out.shape == (2, 8, 16, 16)
    for got, key in [(out.sum(), "sum"), (out[:, :4].sum(), "eps_sum"), (out[:, 4:].sum(), "v_sum"),
                     (cfg.sum(), "cfg_sum"), (cfg[:, :4].sum(), "cfg_eps_sum")]:
        assert abs(got.item() - e[key]) < 1e-3, (key, got.item(), e[key])
    assert abs(out.mean().item() - e["mean"]) < 1e-6
    assert abs(out.abs().mean().item() - e["abs_mean"]) < 1e-5
    for got, key in [(out[0, 0, 0, 0], "e0000"), (out[1, 7, 15, 15], "e17_15_15"), (out[0, 3, 5, 9], "e0359")]:
        assert abs(got.item() - e[key]) < 1e-5, (key, got.item(), e[key])


@pytest.mark.parametrize("which", ["A", "B"])
def test_official_parity_vectors(which):
    _check_outputs(_tiny_official(which), which)


def test_raster_scan_would_be_caught(monkeypatch):
    """The vectors are sensitive to the scan order: swapping paths must break parity."""
    import lamamba_dist.models.lamamba as lm

    model = _tiny_official("A")
    real = lm.cross_scan
    monkeypatch.setattr(lm, "cross_scan", lambda x, tables=None: real(x.transpose(-1, -2), tables))
    with pytest.raises(AssertionError):
        _check_outputs(model, "A")


class _Cfg:  # stands in for yacs.config.CfgNode in an official checkpoint
    pass


def _save_official_like(path, which):
    mod = types.ModuleType("fake_yacs_config")
    _Cfg.__module__ = "fake_yacs_config"
    mod._Cfg = _Cfg
    sys.modules["fake_yacs_config"] = mod
    try:
        sd = official_state_dict(which)
        cfg = _Cfg()
        cfg.MODEL = {"TYPE": "lamamba"}
        torch.save({"model": {k: v + 1 for k, v in sd.items()}, "ema": sd, "opt": {},
                    "args": argparse.Namespace(num_heads=2, window_size=4), "config": cfg}, path)
    finally:
        del sys.modules["fake_yacs_config"]  # the loader machine has no such module, like yacs here


@pytest.mark.parametrize("which", ["A", "B"])
def test_convert_official_cli_end_to_end(tmp_path, capsys, which):
    src, out = tmp_path / "official.pt", tmp_path / "ours.safetensors"
    _save_official_like(src, which)
    assert cli_main(["convert-official", str(src), str(out)]) == 2  # pickled objects: refused without trust
    assert "--trust-pickle" in capsys.readouterr().err
    assert cli_main(["convert-official", str(src), str(out), "--trust-pickle"]) == 0
    model, meta = build_from_weights(out)
    assert meta["source"] == "official" and meta["model"] == "LaMamba-debug"
    _check_outputs(model, which)
    sd, _ = load_weights(out)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in sd)


def test_state_dict_with_missing_or_unexpected_keys_is_refused():
    model = create_model("LaMamba-debug", resolution=64, num_classes=10)
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("final_linear.bias")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as e:
        load_state_dict_strict(model, bad)
    assert "final_linear.bias" in str(e.value) and "extra.weight" in str(e.value)
    bad = dict(sd)
    bad["final_linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="final_linear.weight"):
        load_state_dict_strict(model, bad)
    # wrapper prefixes are stripped, never required
    load_state_dict_strict(model, {f"module.{k}": v for k, v in sd.items()})


def test_wrong_model_name_lists_valid_ones():
    with pytest.raises(KeyError) as e:
        create_model("LaMamba-XXL")
    assert "LaMamba-XL" in str(e.value) and "DiT-XL/2" in str(e.value)


@pytest.mark.parametrize("name", ["LaMamba-debug", "DiT-debug/2"])
def test_wrong_input_shape_names_expected(name):
    m = create_model(name, resolution=64, num_classes=10)
    with pytest.raises(ValueError, match=r"\(B, 4, 8, 8\)"):
        m(torch.randn(1, 4, 16, 16), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="class labels"):
        m(torch.randn(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), torch.tensor([11]))


@pytest.mark.parametrize("name", ["LaMamba-debug", "DiT-debug/2"])
def test_grad_checkpointing_gives_identical_gradients(name):
    torch.manual_seed(0)
    ref = create_model(name, resolution=64, num_classes=10, class_dropout=0.0)
    with torch.no_grad():  # adaLN-Zero makes most grads zero at init: perturb so every path is exercised
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ck = create_model(name, resolution=64, num_classes=10, class_dropout=0.0, grad_checkpointing=True)
    ck.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 9])
    outs, grads = [], []
    for m in (ref, ck):
        m.train()
        out = m(x, t, y)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)


def test_weights_roundtrip_and_truncated_file(tmp_path):
    m = create_model("LaMamba-debug", resolution=64, num_classes=10)
    p = save_weights(tmp_path / "w.safetensors", m.state_dict(), dict(model="LaMamba-debug", resolution=64, num_classes=10))
    m2, meta = build_from_weights(p)
    assert meta["resolution"] == 64
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="w.safetensors"):
        load_weights(p)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_weights(tmp_path / "nope.safetensors")


def test_model_package_imports_no_heavy_dependencies():
    code = ("import sys, lamamba_dist.models, lamamba_dist.ops; "
            "bad=[m for m in ('deepspeed','ray','submitit','wandb') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lamamba_training_step_reduces_loss_on_fixed_batch():
    """A few AdamW steps on one fixed batch must reduce the MSE (the model can learn)."""
    torch.manual_seed(0)
    m = create_model("LaMamba-debug", resolution=32, num_classes=4, class_dropout=0.0, learn_sigma=False)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    x, t, y = torch.randn(4, 4, 4, 4), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    target = torch.randn(4, 4, 4, 4)
    losses = []
    for _ in range(15):
        loss = (m(x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_regional_compile_builds_one_graph_per_block_shape():
    """Shifted and unshifted blocks share code and shapes, and every block sees an fp32 residual under
    autocast, so LaMamba-debug's blocks compile into 4 graphs (r32, r16, r8 with and without the condition
    projection), not one per block variant: compile time is paid per shape, not per block."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from lamamba_dist.models.compile import compile_blocks

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = create_model("LaMamba-debug", resolution=256).train()
    compile_blocks(m, backend="eager", glue=False)  # dynamo's graph capture without inductor: fast on CPU
    x, t, y = torch.randn(2, 4, 32, 32), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, y)
    out.float().square().mean().backward()
    assert counters["stats"]["unique_graphs"] == 4
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_compile_glue_also_compiles_the_modules_between_stages():
    """compile_blocks(glue=True) (the default; ``[train] compile_glue``, bench's ``glue=``) compiles the two patch
    mergings, the two patch expansions and the final expansion beside the blocks, one graph each, with no graph
    break; the model computes the same outputs and gradients as eagerly. glue=False compiles the blocks alone."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    from lamamba_dist.models.compile import compile_blocks, glue_types

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    ref = create_model("LaMamba-debug", resolution=256).train()
    m = compile_blocks(copy.deepcopy(ref), backend="aot_eager")
    glue = [mod for mod in m.modules() if isinstance(mod, glue_types())]
    assert len(glue) == 5 and all(mod._compiled_call_impl is not None for mod in glue)
    x, t, y = torch.randn(2, 4, 32, 32), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    outs, grads = [], []
    for model in (ref, m):
        out = model(x, t, y)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 4 + 5
    assert not counters["graph_break"]
    # without glue only the blocks are compiled
    plain = compile_blocks(copy.deepcopy(ref), backend="eager", glue=False)
    assert all(mod._compiled_call_impl is None for mod in plain.modules() if isinstance(mod, glue_types()))
    torch._dynamo.reset()
    # the trainer's and the bench's defaults follow compile_blocks'; either can switch it off
    import argparse

    from lamamba_dist.bench.model import add_parser, parse_model_spec, run_bench
    from lamamba_dist.config import TrainConfig

    assert TrainConfig().compile_glue is True
    assert parse_model_spec("LaMamba-XL:compile=true:glue=true") == ("LaMamba-XL", dict(compile_model=True,
                                                                                        compile_glue=True))
    assert parse_model_spec("LaMamba-XL:compile=true:glue=false")[1]["compile_glue"] is False
    sub = argparse.ArgumentParser().add_subparsers()
    p = add_parser(sub, "bench", "")
    assert p.parse_args(["--compile"]).compile_glue is True
    assert p.parse_args(["--compile", "--no-compile-glue"]).compile_glue is False
    with pytest.raises(ValueError, match="glue=true .* needs compile"):
        run_bench(["LaMamba-debug:glue=true"], 64, 1, 1, 1, device="cpu")
    # uncompiled rows ignore the default (nothing to compile), and say so in the JSON
    row = run_bench(["LaMamba-debug"], 64, 1, 1, 1, device="cpu")["results"][0]
    assert row["compiled"] is False and row["compile_glue"] is None


@pytest.mark.parametrize("name", ["LaMamba-debug", "DiT-debug/2"])
def test_pure_bf16_forward_and_backward(name):
    """DeepSpeed's bf16 mode runs the model with bf16 parameters and inputs and no autocast: every op must
    accept that (a stray .float() on an activation breaks the next Linear/conv)."""
    torch.manual_seed(0)
    m = create_model(name, resolution=256).to(torch.bfloat16).train()
    x = torch.randn(2, 4, 32, 32, dtype=torch.bfloat16)
    t, y = torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    out = m(x, t, y)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 32, 32)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in m.parameters() if p.requires_grad)


@pytest.mark.slow
def test_compile_memory_budget_makes_the_blocks_keep_less_for_backward():
    """compile_blocks(memory_budget=...) sets AOT autograd's activation budget: the forward graphs of the blocks
    then save fewer bytes for the backward (recomputing instead), and the gradients do not change."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from lamamba_dist.models.compile import compile_blocks

    def saved_bytes_and_grads(budget):
        saved = []

        def fw(gm, inputs):
            outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
            vals = [getattr(v, "meta", {}).get("val") for v in outs[1:] if getattr(v, "op", None) != "placeholder"]
            saved.append(sum(t.numel() * t.element_size() for t in vals if isinstance(t, torch.Tensor)))
            return make_boxed_func(gm.forward)

        def backend(gm, example):
            return aot_module_simplified(gm, example, fw_compiler=fw, bw_compiler=lambda g, _: make_boxed_func(g.forward),
                                         partition_fn=min_cut_rematerialization_partition)

        torch._dynamo.reset()
        torch.manual_seed(0)
        m = create_model("LaMamba-debug", resolution=32, scan_backend="reference", class_dropout=0.0)
        with torch.no_grad():
            for p in m.parameters():  # leave adaLN-Zero so every branch contributes
                p.add_(torch.randn_like(p) * 0.02)
        if budget is not None:
            compile_blocks(m, backend=backend, memory_budget=budget)
        g = torch.Generator().manual_seed(1)
        x, t, y = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([3, 700]), torch.tensor([1, 2])
        m(x, t, y).square().mean().backward()
        return sum(saved), {n: p.grad.clone() for n, p in m.named_parameters()}

    try:
        _, eager = saved_bytes_and_grads(None)
        full, g_full = saved_bytes_and_grads(1.0)
        low, g_low = saved_bytes_and_grads(0.1)
    finally:
        functorch_config.activation_memory_budget = 1.0
        torch._dynamo.reset()
    print(f"saved for backward: {full} bytes at budget 1.0, {low} at 0.1")
    assert full > 0 and low < 0.8 * full, (low, full)
    for n, g in eager.items():
        torch.testing.assert_close(g_full[n], g, rtol=1e-4, atol=1e-5, msg=n)
        torch.testing.assert_close(g_low[n], g, rtol=1e-4, atol=1e-5, msg=n)
    with pytest.raises(ValueError, match="memory budget"):
        compile_blocks(create_model("LaMamba-debug", resolution=32), memory_budget=1.5)
