"""Package foundation: FLOP accounting, strict TOML config, the CLI, and `lamamba bench` on CPU."""

import json
import subprocess
import time
import sys

import pytest
import torch

from lamamba_dist.cli import main as cli_main
from lamamba_dist.config import ConfigError, load_config
from lamamba_dist.flops import model_stats


@pytest.mark.parametrize("name,res,gmacs", [
    ("LaMamba-XL", 256, 45.6),   # official code, torch.utils.flop_counter / 2 (README, Performance)
    ("LaMamba-XL", 512, 181.6),
    ("DiT-XL/2", 256, 118.6),
    ("DiT-XL/2", 512, 524.5),
])
def test_forward_macs_match_the_measured_anchors(name, res, gmacs):
    got = model_stats(name, res)["gmacs"]
    assert abs(got - gmacs) / gmacs < 0.01, (name, res, got)


def test_flops_cli_json(capsys):
    assert cli_main(["flops", "--model", "DiT-S/2", "--resolution", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 32_963_360 and 5.0 < out["gmacs"] < 7.0  # DiT-S/2: 6.06 GFLOPs (MACs) in the paper
    assert cli_main(["flops", "--model", "Nope"]) == 2
    err = capsys.readouterr().err
    assert "LaMamba-XL" in err and "DiT-XL/2" in err


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("train", "sample", "eval", "preprocess", "flops", "bench", "convert-official", "demo", "submit"):
        assert cmd in out.stdout, cmd
    bad = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_bench_what_runs_each_bench_and_the_old_names_stay(tmp_path, capsys):
    """`lamamba bench WHAT` is the command of bench WHAT (lamamba_dist/cli.py BENCHES); `lamamba bench` alone and
    `bench model` are the model bench; bench-train and friends still work."""
    from lamamba_dist.cli import BENCHES

    assert set(BENCHES) == {"model", "train", "sample", "loader", "vae", "kernels", "scaling", "table"}
    for what, alias in BENCHES.items():
        for argv in (["bench", what, "--help"], [alias, "--help"]):
            with pytest.raises(SystemExit) as e:
                cli_main(argv)
            assert e.value.code == 0, argv
        text = capsys.readouterr().out
        assert text.count("usage: lamamba " + alias) == 2, (what, text[:300])
    assert cli_main(["bench", "loader", "--workers", "x"]) == 2
    assert "lamamba bench-loader: error: --workers 'x'" in capsys.readouterr().err
    out = tmp_path / "m.json"
    assert cli_main(["bench", "model", "--models", "DiT-debug/2", "--resolution", "32", "--batch", "2", "--steps", "1",
                     "--warmup", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["bench"] == "model"


def _write(tmp_path, text):
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_config_sections_are_typed_and_defaults_apply(tmp_path):
    cfg = load_config(_write(tmp_path, '[model]\nname = "LaMamba-XL"\nresolution = 512\n[optim]\nlr = 2\n'))
    assert cfg.model.name == "LaMamba-XL" and cfg.model.resolution == 512
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # ints accepted for floats
    assert cfg.train.zero_stage == 2  # default


@pytest.mark.parametrize("text,needle", [
    ('[model]\nnmae = "x"\n', "nmae"),                           # unknown key
    ('[modle]\nname = "x"\n', "modle"),                          # unknown section
    ('[train]\nzero_stage = "two"\n', "zero_stage"),             # wrong type
    ('[train]\nzero_stage = 4\n', "zero_stage"),                 # out of range
    ('[optim]\nlr = -1.0\n', "lr"),                              # out of range
    ('[model]\nresolution = 300\n', "resolution"),               # not a choice
    ('[train]\nglobal_batch = 10\nmicro_batch = 4\n', "global_batch"),  # cross-field
    ('[model\nname = 1\n', "not valid TOML"),
    ('[optim]\nbetas = [1.0, 0.999]\n', "betas"),                # Adam betas in [0, 1)
    ('[optim]\nbetas = [0.9]\n', "betas"),
    ('[optim]\nbetas = [0.9, "x"]\n', "betas"),
    ('[optim]\nlr = inf\n', "finite"),                         # TOML's inf and nan
    ('[optim]\nlr = nan\n', "finite"),
    ('[diffusion]\ncfg_scale = inf\n', "finite"),
])
def test_config_errors_name_the_file_and_key(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert needle in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("override,needle", [
    ("train.steps.x=5", "train.steps is a value, not a table"),
    ("steps=5", "expected section.key=value"),
    ("train..steps=5", "expected section.key=value"),
    ("=5", "expected section.key=value"),
])
def test_malformed_set_is_a_one_line_error_with_rc_2(override, needle, capsys):
    from lamamba_dist.cli import main as cli

    from pathlib import Path

    debug = Path(__file__).resolve().parents[2] / "configs" / "debug.toml"
    rc = cli(["train", "--config", str(debug), "--set", override, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_bench_runs_on_cpu_with_debug_models(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--models", "DiT-debug/2,LaMamba-debug", "--resolution", "32", "--batch", "2",
                   "--steps", "1", "--warmup", "1", "--scan-backend", "reference", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert all(r["scan_backend"] == "reference" and not r["compiled"] for r in data["results"])
    assert data["baseline"] == "DiT-debug/2"
    r0, r1 = data["results"]
    assert r0["img_per_s_ratio_to_first"] == 1.0 and r1["img_per_s_ratio_to_first"] > 0
    for r in (r0, r1):
        assert r["img_per_s"] > 0 and r["train_gflops_per_img"] > 0 and r["time_to_first_step_s"] > 0
        assert r["final_loss"] == r["final_loss"]  # finite, not NaN
    assert data["bench"] == "model" and data["environment"]["torch"] and data["environment"]["device"] == "cpu"
    assert cli_main(["bench", "--models", "LaMamba-XXL"]) == 2
    assert cli_main(["bench", "--models", "DiT-debug/2", "--batch", "2,x"]) == 2


def test_bench_runs_several_batches_in_one_process(tmp_path):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--models", "DiT-debug/2,LaMamba-debug", "--resolution", "32", "--batch", "2,3",
                     "--steps", "1", "--warmup", "1", "--scan-backend", "reference", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["model"]) for r in rows] == [(2, "DiT-debug/2"), (2, "LaMamba-debug"),
                                                        (3, "DiT-debug/2"), (3, "LaMamba-debug")]
    assert rows[0]["img_per_s_ratio_to_first"] == rows[2]["img_per_s_ratio_to_first"] == 1.0


def test_bench_profile_reports_host_and_device_time(tmp_path):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--models", "DiT-debug/2", "--resolution", "32", "--batch", "2", "--steps", "1",
                     "--warmup", "1", "--profile", "2", "--out", str(out)]) == 0
    prof = json.loads(out.read_text())["results"][0]["profile"]
    assert prof["steps"] == 2 and prof["cpu_ms_per_step"] > 0 and prof["top_cpu_ops"]
    assert prof["device_busy_ms_per_step"] is None and prof["device_idle_fraction"] is None  # no device on a CPU


def test_profile_counts_device_busy_time_once_where_events_overlap():
    """bench.py's device_busy_us: the union of the device events' spans (a starved device shows as idle time)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from lamamba_dist.bench.profiling import busy_time, device_busy_us

    assert busy_time([]) == 0.0
    assert busy_time([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17.0
    ev = lambda a, b, dev=DeviceType.CUDA: SimpleNamespace(device_type=dev,  # noqa: E731
                                                           time_range=SimpleNamespace(start=a, end=b))
    events = [ev(0, 100, DeviceType.CPU), ev(10, 30), ev(25, 40), ev(60, 70), ev(80, 80)]
    assert device_busy_us(events) == 40.0  # 10-40 and 60-70; the CPU event and the empty one do not count
    assert device_busy_us([ev(0, 5, DeviceType.CPU)]) is None


def test_device_kernels_are_summed_by_class():
    """profiling.py's kernel classes: the names of the kernels a LaMamba / DiT step runs, and the sums per step."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from lamamba_dist.bench.profiling import device_ms_by_class, kernel_class, top_kernels

    names = {
        "void selective_scan_bwd_kernel<Selective_Scan_bwd_kernel_traits<32, 4, true>>": "selective_scan",
        "_scan1_fwd_kernel": "selective_scan",
        "_snake_scan_bwd_kernel": "selective_scan",
        "_merge_cl_t_kernel": "gather_scatter",
        "void conv_depthwise2d_backward_kernel<c10::BFloat16>": "depthwise_conv",
        "_dwconv_bwd_gs_kernel": "depthwise_conv",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
        "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<float>": "norm",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "triton_red_fused_native_layer_norm_0": "norm",
        "triton_poi_fused_add_mul_silu_3": "inductor",
        "void at::native::_scatter_gather_elementwise_kernel<128, 4>": "gather_scatter",
        "void at::native::bfloat16_copy_kernel_cuda": "copy_cast",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise_reduce",
        "some_new_kernel": "other",
    }
    assert {n: kernel_class(n) for n in names} == names
    ev = lambda name, a, b, dev=DeviceType.CUDA: SimpleNamespace(name=name, device_type=dev,  # noqa: E731
                                                                 time_range=SimpleNamespace(start=a, end=b))
    events = [ev("_scan1_fwd_kernel", 0, 3000), ev("sm90_xmma_gemm", 0, 1000), ev("_scan1_bwd_kernel", 10, 1010),
              ev("aten::mm", 0, 9000, DeviceType.CPU)]
    assert device_ms_by_class(events, steps=2) == {"selective_scan": 2.0, "matmul": 0.5}
    assert device_ms_by_class([], 1) is None
    # the kernels alone, largest first, CPU operators left out; the list cut at ``top``
    assert top_kernels(events, steps=2) == [
        {"kernel": "_scan1_fwd_kernel", "class": "selective_scan", "device_ms_per_step": 1.5, "calls_per_step": 0.5},
        {"kernel": "sm90_xmma_gemm", "class": "matmul", "device_ms_per_step": 0.5, "calls_per_step": 0.5},
        {"kernel": "_scan1_bwd_kernel", "class": "selective_scan", "device_ms_per_step": 0.5, "calls_per_step": 0.5}]
    assert [k["kernel"] for k in top_kernels(events, steps=1, top=1)] == ["_scan1_fwd_kernel"]
    assert top_kernels([], 1) is None


@pytest.mark.slow
def test_cpu_install_pulls_no_cuda_package(tmp_path):
    """Resolve `pip install -e .[data,train,cluster]` against the installed CPU torch: no CUDA wheel may appear."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
         "-c", str(root / "constraints-cpu.txt"), "-e", f"{root}[data,train,cluster]"],
        capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "torch" in names and "deepspeed" in names
    cuda = sorted(n for n in names if n.startswith(("nvidia-", "triton", "mamba-ssm", "causal-conv1d", "flash-attn")))
    assert not cuda, f"a CPU install would pull CUDA packages: {cuda}"


def test_host_profile_finds_the_line_that_waits_and_the_collector():
    """bench.py's host_profile: the sampled main thread's time lands on the line where the step waits; a step that
    collects garbage shows GC time; a thread of the process shows under other_threads."""
    import gc
    import threading

    from lamamba_dist.bench.profiling import host_profile

    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, name="helper-thread", daemon=True)
    helper.start()

    def step():
        time.sleep(0.02)  # the line that waits
        gc.collect()

    try:
        prof = host_profile(step, 10, torch.device("cpu"))
    finally:
        stop.set()
    assert prof["steps"] == 10 and prof["samples"] >= 20
    top = prof["main_thread_leaf"][0]
    assert top["where"].endswith(" step") and top["share"] > 0.5, prof["main_thread_leaf"]
    assert prof["gc_ms_per_step"] > 0
    assert prof["call_ms"]["p50"] >= 20 and prof["host_syncs_per_step"] == 0
    assert any("[helper-thread]" in e["where"] for e in prof["other_threads"])


def test_bench_runs_in_each_precision_mode(tmp_path):
    for precision in ("bf16", "bf16_autocast", "fp32"):
        out = tmp_path / f"{precision}.json"
        assert cli_main(["bench", "--models", "DiT-debug/2", "--resolution", "32", "--batch", "2", "--steps", "1",
                         "--warmup", "1", "--precision", precision, "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["results"]
        assert row["precision"] == precision and row["final_loss"] == row["final_loss"]


def test_bench_models_carry_their_own_settings(tmp_path, capsys):
    """`lamamba bench --models NAME[:key=value...]`: each model in its own mode in one run (bench/model.py
    parse_model_spec), the ratios to the first; bad keys, values and a compile mode without compile are refused
    before anything runs."""
    out = tmp_path / "specs.json"
    assert cli_main(["bench", "--models", "DiT-debug/2,LaMamba-debug:scan=reference:conv=torch,LaMamba-debug:attn=reference",
                     "--resolution", "32", "--batch", "2", "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [(r["spec"], r["model"], r["scan_backend"], r["attn_backend"], r["conv_backend"]) for r in data["results"]]
    assert rows == [("DiT-debug/2", "DiT-debug/2", "auto", "auto", "auto"),
                    ("LaMamba-debug:scan=reference:conv=torch", "LaMamba-debug", "reference", "auto", "torch"),
                    ("LaMamba-debug:attn=reference", "LaMamba-debug", "auto", "reference", "auto")]
    assert data["baseline"] == "DiT-debug/2" and data["results"][0]["img_per_s_ratio_to_first"] == 1.0
    capsys.readouterr()
    for spec, msg in (("LaMamba-debug:scan=nope", "scan='nope'"), ("LaMamba-debug:foo=1", "'foo=1' is not one of"),
                      ("LaMamba-debug:mode=reduce-overhead", "needs compile"), ("Nope:scan=auto", "unknown model")):
        assert cli_main(["bench", "--models", spec, "--resolution", "32", "--batch", "2", "--steps", "1"]) == 2, spec
        assert msg in capsys.readouterr().err, spec
