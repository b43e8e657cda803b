"""Preprocessing: image handling, the batch-invariant encoder, and the real Ray job (kill + rerun)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from lamamba_dist.data_pipeline.images import SourceError, center_crop_arr, load_image, scan_source, split_folder
from lamamba_dist.data_pipeline.preprocess import PreprocessError, Settings, plan_shards, run_preprocess
from image_folder import PLANTED_CONVERTED, PLANTED_SKIPPED, make_image_folder, make_tiny_vae

ROOT = Path(__file__).resolve().parents[2]
# Not `python -m lamamba_dist.cli`: run as __main__, its CLIError is another class than the one commands raise.
LAMAMBA = [sys.executable, "-c", "import sys; from lamamba_dist.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    return make_image_folder(d / "imagenet", size=260), make_tiny_vae(d / "vae")


def test_scan_source_matches_imagefolder(assets, tmp_path):
    src, _ = assets
    classes, images, warnings = scan_source(split_folder(src, "train"))
    assert classes == sorted(classes) and classes[0] == "n00000000"
    assert [im.label for im in images] == sorted(im.label for im in images)
    assert all(classes[im.label] == im.wnid and im.rel.startswith(im.wnid + "/") for im in images)
    assert [im.index for im in images] == list(range(len(images)))
    assert not any(im.rel.endswith(".txt") for im in images)
    assert any("n00000099_empty" in w for w in warnings)
    with pytest.raises(SourceError, match="source folder not found"):
        split_folder(tmp_path / "missing", "train")
    (tmp_path / "empty" / "n1").mkdir(parents=True)
    with pytest.raises(SourceError, match="no image files"):
        scan_source(tmp_path / "empty")


def test_bad_images_converted_or_skipped(assets):
    src, _ = assets
    folder = src / "train"
    for rel, reason in PLANTED_SKIPPED.items():
        arr, msg = load_image(folder / rel, 64, 16)
        assert arr is None and msg.startswith(reason), (rel, msg)
    for rel, note in PLANTED_CONVERTED.items():
        arr, msg = load_image(folder / rel, 64, 16)
        assert arr is not None and arr.shape == (64, 64, 3) and arr.dtype == np.uint8
        assert note in msg, (rel, msg)
    arr, msg = load_image(folder / "n00000000/img0.JPEG", 256, 16)
    assert arr.shape == (256, 256, 3) and msg == ""


def test_center_crop_is_adm():
    from PIL import Image

    # 600x300 -> box-halved while the short side >= 128: 300x150, 150x75 -> bicubic to 128x64 -> centre 64x64
    arr = (np.arange(300 * 600 * 3) % 251).astype(np.uint8).reshape(300, 600, 3)
    out = center_crop_arr(Image.fromarray(arr), 64)
    img = Image.fromarray(arr).resize((300, 150), resample=Image.BOX).resize((150, 75), resample=Image.BOX)
    img = img.resize((128, 64), resample=Image.BICUBIC)
    ref = np.array(img)[:, 32:96]
    assert out.shape == (64, 64, 3) and np.array_equal(out, ref)


def test_plan_shards_deterministic_and_complete():
    plan = plan_shards(23, 5, 0)
    assert [len(s) for s in plan] == [5, 5, 5, 5, 3]
    assert sorted(i for s in plan for i in s) == list(range(23))
    assert all(s == sorted(s) for s in plan)
    assert plan == plan_shards(23, 5, 0) and plan != plan_shards(23, 5, 1)
    assert plan_shards(7, 3, -1) == [[0, 1, 2], [3, 4, 5], [6]]


def test_encoder_batch_invariant_and_flip_layout(assets):
    from lamamba_dist.data_pipeline.vae import VaeEncoder

    _, vae = assets
    enc = VaeEncoder(str(vae), encode_batch=4)
    x = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    mean, logvar = enc.encode(x)
    assert mean.shape == (6, 2, 4, 8, 8) and mean.dtype == np.float16 and logvar.dtype == np.float16
    for i in range(6):  # alone (padded) == inside a batch: the property that makes reruns byte-identical
        m1, l1 = enc.encode(x[i:i + 1])
        assert np.array_equal(m1[0], mean[i]) and np.array_equal(l1[0], logvar[i])
    mirrored, _ = enc.encode(x[:, :, ::-1])
    assert np.array_equal(mirrored[:, 0], mean[:, 1]) and np.array_equal(mirrored[:, 1], mean[:, 0])
    assert not np.array_equal(mean[:, 0], mean[:, 1])


def test_rerun_with_other_settings_is_refused(assets, tmp_path):
    from lamamba_dist.data_pipeline.preprocess import _settings_record
    from lamamba_dist.data_pipeline.vae import vae_identity

    src, vae = assets
    st = Settings(src=str(src), out=str(tmp_path), resolution=64, vae=str(vae))
    classes, images, _ = scan_source(src / "train")
    record = _settings_record(st, src / "train", classes, images, 0.18215, vae_identity(str(vae)))
    (tmp_path / "manifest.json").write_text(json.dumps({**record, "resolution": 512}))
    with pytest.raises(PreprocessError, match="was made with resolution = 512, this run has 64"):
        run_preprocess(st)
    (tmp_path / "manifest.json").write_text(json.dumps({**record, "file_list_sha256": "0" * 64}))
    with pytest.raises(PreprocessError, match="was made with file_list_sha256"):
        run_preprocess(st)


def test_one_job_per_output_folder(assets, tmp_path):
    import socket

    src, vae = assets
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # live holder
    with pytest.raises(PreprocessError, match=f"another lamamba preprocess holds .*PID {os.getpid()}"):
        run_preprocess(Settings(src=str(src), out=str(tmp_path), resolution=64, vae=str(vae)))
    assert (tmp_path / ".lock").exists()


def test_cli_clear_errors(tmp_path):
    r = subprocess.run([*LAMAMBA, "preprocess", str(tmp_path / "nope"), str(tmp_path / "o"),
                        "--resolution", "256", "--vae", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"lamamba preprocess: error: source folder not found: {tmp_path / 'nope'}"


# --------------------------------------------------------------------------- the real Ray job


def _cli(src, out, vae, extra_env=None, **kw):
    cmd = [*LAMAMBA, "preprocess", str(src), str(out), "--resolution", "256",
           "--vae", str(vae), "--shard-size", "4", "--encode-batch", "4", "--num-cpus", "2",
           "--object-store-memory", str(150 * 2**20), "--no-progress"]
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", **(extra_env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _read_tar(path):
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


@pytest.mark.slow
def test_ray_preprocess_end_to_end_killed_and_rerun(assets, tmp_path):
    from lamamba_dist.config import DataConfig
    from lamamba_dist.data import build_latent_loader
    from lamamba_dist.data.shards import npy_load

    src, vae = assets
    # 1. uninterrupted run, in this process
    full = tmp_path / "full"
    man = run_preprocess(Settings(src=str(src), out=str(full), resolution=256, vae=str(vae), shard_size=4,
                                  encode_batch=4, num_cpus=2, object_store_memory=150 * 2**20, progress=False))
    _, images, _ = scan_source(src / "train")
    n = len(images)
    assert man["complete"] and man["num_shards"] == (n + 3) // 4 and man["images_seen"] == n
    assert man["resolution"] == 256 and man["scale_factor"] == pytest.approx(0.18215)
    assert man["latent_shape"] == [2, 4, 32, 32] and man["dtype"] == "float16" and man["vae"] == str(vae)
    assert len(man["vae_weights_sha256"]) == 64
    skipped = {s["path"]: s["reason"] for s in man["skipped"]}
    assert set(skipped) == set(PLANTED_SKIPPED)
    assert all(skipped[p].startswith(r) for p, r in PLANTED_SKIPPED.items())
    converted = {c["path"]: c["conversion"] for c in man["converted"]}
    assert all(note in converted[p] for p, note in PLANTED_CONVERTED.items())
    assert man["images_written"] == n - len(PLANTED_SKIPPED) == sum(s["count"] for s in man["shards"])
    # shard contents: names, key order, members, labels, latents equal to a direct encode
    from lamamba_dist.data_pipeline.vae import VaeEncoder

    enc = VaeEncoder(str(vae), encode_batch=4, threads=1)  # CPU actors run one thread
    by_rel = {im.rel: im for im in images}
    seen = []
    for sh in man["shards"]:
        members = _read_tar(full / sh["name"])
        names = [m[0] for m in members]
        keys = list(dict.fromkeys(nm.split(".", 1)[0] for nm in names))
        assert keys == sorted(keys) and len(keys) == sh["count"]
        assert keys[0] == sh["first_key"] and keys[-1] == sh["last_key"]
        assert names == [f"{k}.{f}" for k in keys for f in ("mean.npy", "logvar.npy", "cls", "json")]
        data = dict(members)
        hist = {}
        for k in keys:
            meta = json.loads(data[f"{k}.json"])
            im = by_rel[meta["path"]]
            assert int(data[f"{k}.cls"]) == im.label == meta["label"]
            hist[str(im.label)] = hist.get(str(im.label), 0) + 1
            seen.append(meta["path"])
        assert hist == sh["class_histogram"]
        k0 = keys[0]
        arr, _ = load_image(src / "train" / json.loads(data[f"{k0}.json"])["path"], 256, 16)
        m, lv = enc.encode(arr[None])
        assert np.array_equal(npy_load(data[f"{k0}.mean.npy"]), m[0])
        assert np.array_equal(npy_load(data[f"{k0}.logvar.npy"]), lv[0])
    assert sorted(seen) == sorted(set(by_rel) - set(PLANTED_SKIPPED))
    # the loader serves it: one epoch over 2 ranks x 2 workers visits every written sample once
    written = man["images_written"]
    cfg = DataConfig(shards=str(full), num_workers=2, num_streams=4)
    keys = []
    for r in range(2):
        ld = build_latent_loader(cfg, micro_batch=1, rank=r, world_size=2, seed=0, latent_size=32)
        for b in itertools.islice(iter(ld), written // 4 * 2):
            assert b["latent"].shape == (1, 4, 32, 32)
            keys += b["key"]
    assert len(keys) == len(set(keys)) == written // 4 * 4

    # 2. the same job killed after its first shard (a delay per shard makes "mid-way" certain)
    part = tmp_path / "part"
    proc = _cli(src, part, vae, extra_env={"LAMAMBA_PREPROCESS_SHARD_DELAY": "60"}, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (part / "manifest.json").is_file() and json.loads((part / "manifest.json").read_text())["shards"]:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = json.loads((part / "manifest.json").read_text())
    assert not killed["complete"] and 1 <= len(killed["shards"]) < man["num_shards"]
    first = killed["shards"][0]["name"]
    (part / "train-000099.tar.tmp").write_bytes(b"half-written shard of a killed job")
    victim = next(s["name"] for s in man["shards"] if s["name"] != first)
    (part / victim).write_bytes(b"a shard whose bytes do not match the manifest")
    inode_before = (part / first).stat().st_ino

    # 3. rerun the same command: keeps the verified shard, remakes the rest, same bytes as the full run
    proc = _cli(src, part, vae)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert (part / first).stat().st_ino == inode_before, "a verified shard must not be rewritten"
    assert not list(part.glob("*.tmp"))
    assert sorted(p.name for p in part.glob("*.tar")) == sorted(p.name for p in full.glob("*.tar"))
    for p in full.glob("*.tar"):
        assert (part / p.name).read_bytes() == p.read_bytes(), p.name
    rerun = json.loads((part / "manifest.json").read_text())
    assert rerun == json.loads((full / "manifest.json").read_text())


def _tiny_png(path):
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(path)


def test_scan_visits_each_real_directory_once_and_never_opens_special_files(tmp_path):
    """`ln -s .. n01/loop` used to multiply the images (all labelled class 0); a FIFO named *.JPEG hung the job."""
    from lamamba_dist.data_pipeline.images import scan_source

    for wnid in ("n01", "n02"):
        (tmp_path / wnid).mkdir()
        _tiny_png(tmp_path / wnid / "a.png")
    (tmp_path / "n01" / "loop").symlink_to("..")            # a loop back to SRC
    (tmp_path / "n01" / "again").symlink_to(tmp_path / "n02")  # another class's folder, a second time
    (tmp_path / "n01" / "sub").mkdir()
    (tmp_path / "n01" / "sub" / "back").symlink_to(tmp_path / "n01")  # a loop inside a class
    (tmp_path / "n02" / "same.png").symlink_to(tmp_path / "n02" / "a.png")  # the same file twice
    os.mkfifo(tmp_path / "n02" / "pipe.JPEG")
    (tmp_path / "n02" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    classes, images, warnings = scan_source(tmp_path)
    assert classes == ["n01", "n02"]
    assert [(im.rel, im.label) for im in images] == [("n01/a.png", 0), ("n02/a.png", 1)]
    text = "\n".join(warnings)
    assert "n01/loop: a link into the source folder itself" in text, text
    assert "n01/again: a link into class folder n02" in text, text
    assert "n01/sub/back: the same directory as n01" in text, text
    assert "n02/pipe.JPEG: a FIFO, not a regular file; not opened" in text, text
    assert "n02/same.png: the same file as n02/a.png" in text and "n02/dangling.jpg: cannot stat" in text, text


def test_a_read_that_stalls_times_out_and_the_image_is_skipped(tmp_path, monkeypatch):
    """A read that never returns (a hung network mount) is given up after the timeout and the image skipped;
    later reads still work. The hang is a FIFO without a writer behind the real read path."""
    import time

    from lamamba_dist.data_pipeline import images

    _tiny_png(tmp_path / "ok.png")
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    real = images._read_bytes
    monkeypatch.setattr(images, "_read_bytes", lambda path: open(fifo, "rb").read() if path == "hung.png" else real(path))
    t0 = time.monotonic()
    arr, msg = images.load_image("hung.png", 16, 8, timeout=0.5)
    assert arr is None and msg == "unreadable: read timed out after 0.5 s (a hung mount?)", msg
    assert time.monotonic() - t0 < 10
    arr, msg = images.load_image(str(tmp_path / "ok.png"), 16, 8, timeout=5.0)  # the next read is not stuck behind it
    assert arr is not None and arr.shape == (16, 16, 3), msg
    arr, msg = images.load_image(str(fifo), 16, 8, timeout=5.0)  # a FIFO itself is refused before any open()
    assert arr is None and "not a regular file" in msg
    w = os.open(fifo, os.O_WRONLY)  # release the stuck reader thread (its open() returns, read() sees EOF)
    os.close(w)
