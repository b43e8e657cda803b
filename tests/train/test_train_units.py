"""Fast single-process tests of the training package: checkpoint folders, DeepSpeed config, shipped configs."""

import io
import json
import os
from pathlib import Path

import pytest
import torch

from lamamba_dist.config import load_config
from lamamba_dist.train import EXIT_REQUEUE, clear_stop_request, request_stop, stop_requested
from lamamba_dist.train import checkpoint as ckpt
from lamamba_dist.train.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[2]


def fake_checkpoint(run_dir: Path, step: int, payload: bytes = b"x" * 100) -> Path:
    """A checkpoint written through the real write path (tmp folder, marker, publish)."""
    tmp = ckpt.new_tmp_dir(run_dir, step, "abc")
    (tmp / "ds" / "state").mkdir(parents=True)
    (tmp / "ds" / "state" / "optim.pt").write_bytes(payload + bytes([step]))
    (tmp / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    ckpt.write_marker(tmp, ckpt.digest_files(tmp, ckpt.list_files(tmp)), step)
    return ckpt.publish(tmp, run_dir, step)


def test_newest_complete_checkpoint_is_chosen_and_unfinished_saves_ignored(tmp_path):
    for s in (10, 20):
        fake_checkpoint(tmp_path, s)
    # An interrupted save: files but no marker, under the final name (as if renamed by hand) and under a tmp name.
    (tmp_path / "step_00000030").mkdir()
    (tmp_path / "step_00000030" / ckpt.STATE_FILE).write_text("{}")
    (tmp_path / "step_00000040.tmp-zz").mkdir()
    warnings = []
    assert ckpt.find_latest(tmp_path, warn=warnings.append) == tmp_path / "step_00000020"
    assert len(warnings) == 1 and "step_00000030" in warnings[0] and "did not finish" in warnings[0]
    assert (tmp_path / "latest").read_text().strip() == "step_00000020"
    removed = ckpt.remove_stale_tmp(tmp_path)
    assert [p.name for p in removed] == ["step_00000040.tmp-zz"]


@pytest.mark.parametrize("damage", ["truncate", "remove", "flip", "marker"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    f = newest / "ds" / "state" / "optim.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:10])
    elif damage == "remove":
        f.unlink()
    elif damage == "flip":  # same size, different content: only the hash sees it
        b = bytearray(f.read_bytes())
        b[0] ^= 0xFF
        f.write_bytes(bytes(b))
    else:
        (newest / ckpt.MARKER).write_text("{not json")
    warnings = []
    assert ckpt.find_latest(tmp_path, hashes=True, warn=warnings.append) == tmp_path / "step_00000001"
    assert len(warnings) == 1 and "step_00000002" in warnings[0]
    expected = {"truncate": "truncated", "remove": "missing", "flip": "sha256", "marker": "unreadable"}[damage]
    assert expected in warnings[0]
    if damage == "flip":  # size-only verification cannot see a flipped byte
        assert ckpt.find_latest(tmp_path, hashes=False, warn=warnings.append) == newest


def test_prune_keeps_the_newest_intact_checkpoints(tmp_path):
    for s in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, s)
    (tmp_path / "step_00000004" / "ds" / "state" / "optim.pt").write_bytes(b"")  # damaged newest
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000001"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert left == ["step_00000002", "step_00000003", "step_00000004"]


def test_marker_refuses_unlisted_files(tmp_path):
    tmp = ckpt.new_tmp_dir(tmp_path, 5, "q")
    tmp.mkdir(parents=True)
    (tmp / "a").write_text("a")
    (tmp / "b").write_text("b")
    with pytest.raises(ckpt.CheckpointError, match="without a digest"):
        ckpt.write_marker(tmp, ckpt.digest_files(tmp, ["a"]), 5)


def test_resolve_checkpoint_errors_name_the_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such run directory"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("sig", ["SIGUSR2", "SIGTERM"])
def test_stop_signals_set_the_flag_and_handlers_are_restored(sig):
    import signal

    from lamamba_dist.train.signals import StopSignals, stop_reason

    signum = getattr(signal, sig)
    before = signal.getsignal(signum)
    clear_stop_request()
    with StopSignals():
        os.kill(os.getpid(), signum)
        assert stop_requested() and stop_reason() == f"signal {sig}"
    assert signal.getsignal(signum) is before
    clear_stop_request()


def test_stop_request_flag():
    clear_stop_request()
    assert not stop_requested()
    request_stop("test")
    assert stop_requested()
    clear_stop_request()
    assert EXIT_REQUEUE == 3


def test_ds_config_follows_the_paper_recipe_and_batch_layout():
    cfg = load_config(ROOT / "configs" / "debug.toml")
    ds = build_ds_config(cfg.train, cfg.optim, world_size=2, on_cuda=False)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["lr"] == 1e-4 and opt["params"]["weight_decay"] == 0.01
    assert opt["params"]["betas"] == [0.9, 0.999] and opt["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # constant LR
    # No clipping, as DeepSpeed itself reads the config (its default, 1.0, would clip)
    from deepspeed.runtime.config import get_gradient_clipping

    assert get_gradient_clipping(ds) == 0.0
    assert ds["zero_optimization"]["compute_grad_norm"] is False  # ZeRO-2, no clipping: nonfinite.py's norm
    assert ds["zero_optimization"]["contiguous_gradients"] is False  # CPU cost per parameter (ds_config.py)
    assert not ds["bf16"]["enabled"] and not ds["torch_autocast"]["enabled"]  # debug.toml trains fp32
    from deepspeed.utils.config import get_timers_config

    assert not get_timers_config(ds).synchronized  # no device synchronize per forward and step
    import dataclasses

    bf16 = build_ds_config(dataclasses.replace(cfg.train, precision="bf16"), cfg.optim, world_size=2, on_cuda=True)
    assert bf16["bf16"] == {"enabled": True, "check_grad_overflow": False}  # the trainer's fused check replaces it
    amp = build_ds_config(dataclasses.replace(cfg.train, precision="bf16_autocast"), cfg.optim, world_size=2,
                          on_cuda=True)
    assert not amp["bf16"]["enabled"] and amp["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    clipped = build_ds_config(cfg.train, dataclasses.replace(cfg.optim, grad_clip=1.0), world_size=2, on_cuda=False)
    assert get_gradient_clipping(clipped) == 1.0 and "compute_grad_norm" not in clipped["zero_optimization"]
    gpu = build_ds_config(cfg.train, cfg.optim, world_size=4, on_cuda=True)
    assert gpu["optimizer"]["params"]["fused"] is True and gpu["gradient_accumulation_steps"] == 1
    with pytest.raises(ValueError, match="not a multiple"):
        build_ds_config(cfg.train, cfg.optim, world_size=3, on_cuda=False)


CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_parses_and_dry_run_builds(path):
    from lamamba_dist.train.dryrun import dry_run

    cfg = load_config(path)
    summary = dry_run(cfg)  # model on the meta device: no memory for XL
    assert cfg.model.name in summary


def test_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    want = {"debug", "demo", "dit_xl2_256", "dit_xl2_512"} | {f"lamamba_{s}_{r}" for s in "SBLX" if s != "X" for r in (256, 512)}
    want |= {"lamamba_XL_256", "lamamba_XL_512", "lamamba_XXL_256"}
    assert want <= names, sorted(want - names)


@pytest.mark.slow
def test_ema_under_zero_equals_plain_pytorch_ema(tmp_path):
    """ZeRO-3 (fp32) and ZeRO-2 / stage 0 (bf16, fp32 master fragments): ZeroEMA == full-tensor EMA, bitwise."""
    import subprocess
    import sys

    from train_helpers import train_env

    setups = ["3-fp32", "2-bf16", "0-fp32", "1-fp32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "ema_zero_script.py"), *setups]
    env = {**train_env(), "EMA_RESULTS_DIR": str(tmp_path)}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    import re

    for r in (0, 1):  # one results file per rank: the ranks' shared stdout interleaves their lines
        lines = (tmp_path / f"rank{r}.txt").read_text().splitlines()
        assert len(lines) == len(setups), (r, lines, res.stdout)
        for s, line in zip(setups, lines):
            assert re.fullmatch(rf"EMA_OK zero{s} \d+ rank{r}", line), (s, r, line)


def weights_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint with real inference weights (EMA and raw), through the real write path."""
    from lamamba_dist.models import create_model
    from lamamba_dist.weights import save_weights

    torch.manual_seed(step)
    sd = create_model("LaMamba-debug", resolution=32, num_classes=10).state_dict()
    meta = dict(model="LaMamba-debug", resolution=32, num_classes=10, learn_sigma=True, step=step)
    tmp = ckpt.new_tmp_dir(run_dir, step, "w")
    tmp.mkdir(parents=True)
    save_weights(tmp / ckpt.EMA_FILE, sd, dict(meta, ema=True))
    save_weights(tmp / ckpt.RAW_FILE, sd, dict(meta, ema=False))
    (tmp / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    ckpt.write_marker(tmp, ckpt.digest_files(tmp, ckpt.list_files(tmp)), step)
    return ckpt.publish(tmp, run_dir, step)


def _flip_byte(path: Path, at: int = -100) -> None:
    b = bytearray(path.read_bytes())
    b[at] ^= 0xFF
    path.write_bytes(bytes(b))


def test_export_and_sample_verify_the_checkpoint_they_read(tmp_path, capsys):
    """A same-size flipped byte in ema.safetensors: export falls back to the newest folder that verifies (warning
    naming both), refuses a damaged folder given by name, and reads it only with --no-verify (loudly)."""
    from lamamba_dist.cli import main as cli
    from lamamba_dist.weights import load_weights

    run = tmp_path / "run"
    weights_checkpoint(run, 1)
    newest = weights_checkpoint(run, 2)
    _flip_byte(newest / ckpt.EMA_FILE)
    out = tmp_path / "w.safetensors"
    assert cli(["export", str(run), str(out)]) == 0
    err = capsys.readouterr().err
    assert "step_00000002 is not usable" in err and "sha256" in err and "falling back to step_00000001" in err, err
    assert load_weights(out)[1]["step"] == 1
    assert cli(["export", str(newest), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "ema.safetensors does not match its sha256" in err and "--no-verify" in err, err
    assert not (tmp_path / "x.safetensors").exists()
    assert cli(["export", str(newest), str(tmp_path / "y.safetensors"), "--no-verify"]) == 0
    assert "--no-verify: the weights are NOT checked" in capsys.readouterr().err
    assert load_weights(tmp_path / "y.safetensors")[1]["step"] == 2
    assert cli(["export", str(run), str(tmp_path / "raw.safetensors"), "--raw"]) == 0  # raw file intact: step 2
    assert load_weights(tmp_path / "raw.safetensors")[1]["step"] == 2
    capsys.readouterr()
    assert cli(["sample", "--checkpoint", str(newest), "--num-samples", "1", "--steps", "1",
                "--out", str(tmp_path / "s")]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


def test_prune_removes_old_damaged_folders_and_a_save_moves_a_damaged_one_aside(tmp_path):
    for s in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, s)
    (tmp_path / "step_00000001" / "ds" / "state" / "optim.pt").write_bytes(b"")  # damaged, old
    removed = ckpt.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000002"]
    (tmp_path / "step_00000004" / "ds" / "state" / "optim.pt").write_bytes(b"")  # damaged, newest
    fake_checkpoint(tmp_path, 4)  # the same step saved again (after resuming from step 3)
    aside = list((tmp_path / ckpt.DAMAGED_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step_00000004-")
    assert "truncated" in (aside[0] / "REASON.txt").read_text()
    assert ckpt.verify_checkpoint(tmp_path / "step_00000004") is None


def test_export_and_sample_output_paths_that_cannot_be_written_are_one_line_errors(tmp_path, capsys):
    from lamamba_dist.cli import main as cli
    from train_helpers import read_only_folder

    run = tmp_path / "run"
    weights_checkpoint(run, 1)
    (tmp_path / "adir").mkdir()
    assert cli(["export", str(run), str(tmp_path / "adir")]) == 2
    assert "is an existing folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert cli(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "afile"), "--num-samples", "1"]) == 2
    assert "--out" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only_folder(ro) as denied:
        assert cli(["export", str(run), str(ro / "w.safetensors")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write" in err[0] and denied in err[0], err
        assert not list(ro.iterdir())  # no *.tmp left


def test_host_buffers_wait_for_their_background_arena(monkeypatch):
    """HostBuffers.reserve pins its arena in a thread; wait_reserved returns at once when nothing is reserved,
    blocks until the thread is done otherwise, and returns even when pinning fails (no pinnable memory)."""
    import threading

    from lamamba_dist.train import snapshot
    from lamamba_dist.train.snapshot import HostBuffers

    hb = HostBuffers(pinned=True)
    assert hb.wait_reserved(timeout=5) == 0.0  # nothing reserved: no wait
    gate = threading.Event()
    real_empty = torch.empty

    def slow_empty(*a, pin_memory=False, **k):
        if pin_memory:
            gate.wait(30)
            return real_empty(*a, **k)  # stands in for pinned memory on this CPU machine
        return real_empty(*a, **k)

    monkeypatch.setattr(snapshot.torch, "empty", slow_empty)
    hb.reserve(4096)
    assert hb.wait_reserved(timeout=0.2) >= 0.15 and not hb._arena_ready.is_set()  # still pinning
    threading.Timer(0.3, gate.set).start()
    assert hb.wait_reserved(timeout=30) > 0.0 and hb._arena is not None and hb._arena.numel() == 4096
    assert hb.wait_reserved() == 0.0
    monkeypatch.setattr(snapshot.torch, "empty", real_empty)  # pinning fails here: no accelerator
    hb2 = HostBuffers(pinned=True)
    hb2.reserve(4096)
    hb2.wait_reserved(timeout=30)
    assert hb2._arena_ready.is_set() and hb2._arena is None and not hb2._reserving


def test_host_snapshot_copies_every_tensor_and_reuses_its_buffers():
    """A background save's snapshot (snapshot.HostBuffers): tensors copied (later in-place updates do not
    reach it), containers rebuilt with their types, and the next save's copies land in the same buffers."""
    from collections import OrderedDict, namedtuple

    from lamamba_dist.train.snapshot import HostBuffers

    Pair = namedtuple("Pair", "a b")
    live = {"w": torch.ones(3), "shape": torch.Size([2, 3]), "groups": [torch.zeros(2, 2), 7, "x"],
            "od": OrderedDict(m=torch.arange(4)), "pair": Pair(torch.full((2,), 5.0), None)}
    buf = HostBuffers(pinned=False)
    buf.start()
    snap = buf.tree(live)
    live["w"].add_(1)
    live["od"]["m"].mul_(0)
    assert snap["w"].eq(1).all() and snap["od"]["m"].tolist() == [0, 1, 2, 3]
    assert type(snap["shape"]) is torch.Size and type(snap["od"]) is OrderedDict and type(snap["pair"]) is Pair
    assert snap["groups"][1:] == [7, "x"] and snap["pair"].b is None
    assert buf.nbytes == sum(t.numel() * t.element_size() for t in
                             (live["w"], live["groups"][0], live["od"]["m"], live["pair"].a))
    ptr = snap["w"].data_ptr()
    buf.start()
    again = buf.tree(live)
    assert again["w"].data_ptr() == ptr and again["w"].eq(2).all()
    # with an arena (pinned and reserved ahead of the first save on GPUs): carved out of it in order, 64-byte
    # aligned, the same addresses every save; what does not fit gets a buffer of its own
    arena = torch.zeros(197, dtype=torch.uint8)  # an odd size: torch.save of a view of it could not be loaded
    buf.set_arena(arena)
    for _ in range(2):
        buf.start()
        snap = buf.tree(live)
        inside = [k for k, t in (("w", snap["w"]), ("g", snap["groups"][0]), ("m", snap["od"]["m"]),
                                 ("a", snap["pair"].a)) if arena.data_ptr() <= t.data_ptr() < arena.data_ptr() + 196]
        assert inside == ["w", "g", "m"], inside  # 12 + 16 + 32 bytes at 0, 64, 128; the last 8 do not fit at 192
        assert [(t.data_ptr() - arena.data_ptr()) for t in (snap["w"], snap["groups"][0], snap["od"]["m"])] == \
            [0, 64, 128]
        assert snap["w"].eq(2).all() and snap["pair"].a.eq(5).all()
    # each copy is a storage of its own inside the arena: a file holds the state's bytes, not the arena's, and
    # torch.save / safetensors round-trip it
    for k in ("w", "shape", "groups", "od"):
        f, fresh = io.BytesIO(), io.BytesIO()
        torch.save(snap[k], f)
        torch.save(HostBuffers(pinned=False).tree(snap[k]), fresh)  # the same values in buffers of their own
        assert len(f.getvalue()) == len(fresh.getvalue()), k
        f.seek(0)
        back = torch.load(f)
        assert str(back) == str(snap[k])
    from safetensors.torch import load, save
    tensors = {"w": snap["w"], "g": snap["groups"][0], "m": snap["od"]["m"]}
    assert {k: v.tolist() for k, v in load(save(tensors)).items()} == {k: v.tolist() for k, v in tensors.items()}
    assert snap["w"].untyped_storage().nbytes() == 12


def test_raw_weights_rebuilt_from_the_deepspeed_state_equal_model_safetensors(tmp_path):
    """[checkpoint] inference_weights = true writes model.safetensors; without it, checkpoint.raw_weights rebuilds
    the same tensors from the DeepSpeed state (what `lamamba export --raw` reads)."""
    import shutil
    import subprocess
    import sys

    from train_helpers import DEBUG_CONFIG, ROOT, train_env

    from lamamba_dist.weights import load_weights

    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG),
                          "--set", f'checkpoint.dir="{run}"', "--set", "train.steps=2", "--set",
                          "checkpoint.inference_weights=true"], cwd=ROOT, env=train_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    step = run / "step_00000002"
    written, _ = load_weights(step / ckpt.RAW_FILE)
    copy = tmp_path / "without"
    shutil.copytree(step, copy, ignore=shutil.ignore_patterns(ckpt.RAW_FILE))
    rebuilt = ckpt.raw_weights(copy)
    assert rebuilt.keys() == written.keys()
    for k in written:
        assert torch.equal(rebuilt[k], written[k]), k


@pytest.mark.slow
def test_a_process_that_trained_in_process_can_launch_training(tmp_path):
    """A plain single-process Trainer (a notebook, a test worker) makes its own 1-rank process group; `lamamba train`
    started from that process afterwards inherits its environment and must not try to bind the parent's port."""
    import subprocess
    import sys

    from train_helpers import DEBUG_CONFIG, ROOT, train_env

    from lamamba_dist.train.trainer import Trainer

    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)  # a plain single process, as a notebook is (restored below)
    try:
        cfg = load_config(DEBUG_CONFIG, [f'checkpoint.dir="{tmp_path / "a"}"', "train.steps=1"])
        tr = Trainer(cfg, resume=False)
        tr.train_step(iter(tr.loader))
        env = train_env({k: v for k, v in os.environ.items() if k in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_ADDR", "MASTER_PORT")})
        res = subprocess.run([sys.executable, "-m", "lamamba_dist.cli", "train", "--config", str(DEBUG_CONFIG),
                              "--set", f'checkpoint.dir="{tmp_path / "b"}"', "--set", "train.steps=1"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        tr.close()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_checkpoint_files_are_hashed_as_they_are_written_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """snapshot.save_hashed: the digest it returns is the sha256 of the file it wrote (the one COMPLETE.json
    lists), the file loads, and a write that fails raises the OSError with the file's path."""
    import errno

    import lamamba_dist.train.snapshot as snapshot
    from lamamba_dist.hashing import sha256_file

    obj = {"w": torch.randn(300, 7), "b": [torch.arange(5), {"c": torch.ones(3, dtype=torch.bfloat16)}], "n": 3}
    digest = snapshot.save_hashed(obj, tmp_path / "a.pt")
    assert digest == sha256_file(tmp_path / "a.pt")
    back = torch.load(tmp_path / "a.pt", weights_only=False)
    assert torch.equal(back["w"], obj["w"]) and torch.equal(back["b"][1]["c"], obj["b"][1]["c"])

    class Full:  # a disk that fills up after two writes
        def __init__(self):
            self.n = 0

        def write(self, b):
            self.n += 1
            if self.n > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(snapshot, "open", lambda *a, **k: Full(), raising=False)
    with pytest.raises(OSError) as e:
        snapshot.save_hashed({"w": torch.randn(100_000)}, tmp_path / "b.pt")
    assert e.value.filename == str(tmp_path / "b.pt") and e.value.errno == errno.ENOSPC


def test_seed_rng_draws_like_torch_manual_seed():
    """train/rng.py seed_rng seeds what a step draws from (CPU, and the step's GPU) as torch.manual_seed does."""
    from lamamba_dist.train.rng import seed_rng

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        torch.manual_seed(123)
        ref = torch.randn(5, device=dev), torch.rand(3)
        torch.manual_seed(7)  # another state in between
        torch.randn(2, device=dev)
        seed_rng(123, dev)
        got = torch.randn(5, device=dev), torch.rand(3)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), dev


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice values are a POSIX (Linux) feature")
def test_checkpoint_writer_thread_runs_at_a_lower_cpu_priority_than_training():
    """The background writer lowers its own thread's priority (checkpointing.WRITER_NICE), not the process's: the
    training thread that queues the GPU's work keeps its priority."""
    import threading

    from lamamba_dist.train.checkpointing import WRITER_NICE
    from lamamba_dist.train.snapshot import lower_thread_priority

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def writer():
        seen["ok"] = lower_thread_priority(WRITER_NICE)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=writer)
    t.start()
    t.join()
    assert WRITER_NICE > 0 and seen["ok"]
    assert seen["nice"] == min(19, main_before + WRITER_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before
