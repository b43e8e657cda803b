"""The latent loader: exact resume, exactly-once epochs across ranks and workers, elastic resume, faults."""

from __future__ import annotations

import collections
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lamamba_dist.config import DataConfig
from lamamba_dist.data import DataError, build_latent_loader
from lamamba_dist.data.shards import encode_sample, write_tar_atomic
from latent_shards import make_shards

S = 4


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def cfg_for(folder, **kw):
    kw.setdefault("num_workers", 2)
    return DataConfig(shards=str(folder), **kw)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["label"], y["label"])
        assert torch.equal(x["latent"], y["latent"])


def test_resume_exact_two_workers(tmp_path):
    make_shards(tmp_path, [7, 9, 5, 8])  # 29 samples, odd sizes, 4 shards
    cfg = cfg_for(tmp_path, num_streams=4)
    kw = dict(micro_batch=4, rank=0, world_size=1, seed=3, latent_size=S)
    ref = take(build_latent_loader(cfg, **kw), 12)  # crosses the epoch boundary (12 * 4 > 29)
    first = build_latent_loader(cfg, **kw)
    got = take(first, 5)  # odd: the next batch comes from worker 1
    state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint round trip
    assert state["images_seen"] == 20
    resumed = build_latent_loader(cfg, **kw, state=state)
    got += take(resumed, 7)
    assert_batches_equal(ref, got)
    b = ref[0]
    assert b["latent"].shape == (4, 4, S, S) and b["latent"].dtype == torch.float32
    assert b["label"].dtype == torch.long and len(b["key"]) == 4


@pytest.mark.parametrize("workers,micro", [(0, 3), (2, 3), (2, 5)])
def test_resume_exact_when_micro_batch_is_not_a_multiple_of_streams(tmp_path, workers, micro):
    all_keys = make_shards(tmp_path, [9, 8, 7])  # 24 samples, 4 streams of 6; 2 streams per worker (or 4 with none)
    cfg = cfg_for(tmp_path, num_streams=4, num_workers=workers)
    kw = dict(micro_batch=micro, rank=0, world_size=1, seed=2, latent_size=S)
    ref = take(build_latent_loader(cfg, **kw), 10)
    for cut in (1, 2, 3):
        ld = build_latent_loader(cfg, **kw)
        got = take(ld, cut)
        got += take(build_latent_loader(cfg, **kw, state=ld.state_dict()), 10 - cut)
        assert_batches_equal(ref, got)
    ld = build_latent_loader(cfg, **kw)
    keys = [k for b in take(ld, 24) for k in b["key"]][:24 * micro]
    assert collections.Counter(keys) == collections.Counter(all_keys * micro)  # micro epochs, each exactly once


def test_waterfill_matches_simulation():
    import random

    from lamamba_dist.data.loader import _waterfill

    rnd = random.Random(0)
    for _ in range(200):
        pos = {s: rnd.randrange(6) for s in rnd.sample(range(20), rnd.randrange(1, 6))}
        draws = rnd.randrange(30)
        sim = dict(pos)
        for _ in range(draws):
            s = min(sim, key=lambda s: (sim[s], s))
            sim[s] += 1
        assert _waterfill(pos, draws) == sim


def test_iterating_again_continues(tmp_path):
    make_shards(tmp_path, [6, 6])
    cfg = cfg_for(tmp_path, num_workers=0, num_streams=2)
    kw = dict(micro_batch=2, rank=0, world_size=1, seed=0, latent_size=S)
    ref = take(build_latent_loader(cfg, **kw), 6)
    loader = build_latent_loader(cfg, **kw)
    got = take(loader, 2) + take(loader, 4)
    assert_batches_equal(ref, got)


def epoch_keys(folder, counts_total, world_size, workers, micro, state=None, batches=None, seed=1, num_streams=4):
    cfg = cfg_for(folder, num_workers=workers, num_streams=num_streams)
    loaders = [build_latent_loader(cfg, micro_batch=micro, rank=r, world_size=world_size, seed=seed, latent_size=S,
                                   state=state) for r in range(world_size)]
    if batches is None:
        batches = counts_total // (micro * world_size)
    keys = []
    for ld in loaders:
        for b in take(ld, batches):
            keys += b["key"]
    return keys, loaders


@pytest.mark.parametrize("counts", [[10, 10, 4], [24]])
def test_exactly_once_epoch_two_ranks_two_workers(tmp_path, counts):
    # 3 shards, or a single one, for 2 ranks x 2 workers: fewer shards than readers is fine (streams share shards).
    all_keys = make_shards(tmp_path, counts)
    keys, loaders = epoch_keys(tmp_path, 24, world_size=2, workers=2, micro=3)
    assert sorted(keys) == sorted(all_keys)
    states = [ld.state_dict() for ld in loaders]
    assert states[0] == states[1], "every rank must describe the same global position"
    assert states[0]["images_seen"] == 24 and states[0]["epoch"] == 1
    # Epoch 2 is another permutation of the same samples.
    keys2, _ = epoch_keys(tmp_path, 24, world_size=2, workers=2, micro=3, state=states[0])
    assert sorted(keys2) == sorted(all_keys) and keys2 != keys


def global_steps(folder, world_size, workers, micro, accum, steps, state=None, seed=1, num_streams=4):
    """Per global step: {key: latent} over all ranks and accumulation micro-steps; and rank 0's final state."""
    cfg = cfg_for(folder, num_workers=workers, num_streams=num_streams)
    its, loaders = [], []
    for r in range(world_size):
        ld = build_latent_loader(cfg, micro_batch=micro, rank=r, world_size=world_size, seed=seed, latent_size=S,
                                 state=state)
        loaders.append(ld)
        its.append(iter(ld))
    out = []
    for _ in range(steps):
        step = {}
        for it in its:
            for _ in range(accum):
                b = next(it)
                step.update(zip(b["key"], b["latent"]))
        out.append(step)
    states = [ld.state_dict() for ld in loaders]
    assert all(st == states[0] for st in states), "every rank must describe the same global position"
    return out, states[0]


def assert_steps_equal(a, b):
    assert [sorted(x) for x in a] == [sorted(y) for y in b]
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_elastic_resume_keeps_global_batches(tmp_path):
    # 40 samples, N = 4 streams, global batch G = 8 (G % N == 0): a global step is the next 2 samples of every stream.
    all_keys = make_shards(tmp_path, [13, 11, 9, 7])
    ref, _ = global_steps(tmp_path, world_size=2, workers=2, micro=4, accum=1, steps=8)
    assert sorted(k for st in ref[:5] for k in st) == sorted(all_keys)  # 5 steps = one epoch, each sample once
    head, state = global_steps(tmp_path, world_size=2, workers=2, micro=4, accum=1, steps=3)
    assert state["images_seen"] == 24
    assert_steps_equal(head, ref[:3])
    # resume on 1 rank (2 x accumulation, 2 workers) and on 4 ranks (micro 2, no workers): same global batches
    tail1, _ = global_steps(tmp_path, world_size=1, workers=2, micro=4, accum=2, steps=5, state=state)
    tail4, _ = global_steps(tmp_path, world_size=4, workers=0, micro=2, accum=1, steps=5, state=state)
    assert_steps_equal(tail1, ref[3:])
    assert_steps_equal(tail4, ref[3:])


def test_latent_is_drawn_from_stored_posterior(tmp_path):
    make_shards(tmp_path, [16], logvar=-40.0)  # std ~ 2e-9: z == mean * scale
    cfg = cfg_for(tmp_path, num_workers=0, num_streams=1)
    batches = take(build_latent_loader(cfg, micro_batch=16, rank=0, world_size=1, seed=0, latent_size=S), 1)
    lat, keys = batches[0]["latent"], batches[0]["key"]
    flips = []
    for z, k in zip(lat, keys):
        idx = int(k.split("_")[0])
        if idx == 0:
            continue
        v = z[0, 0, 0].item() / 0.5
        assert v == pytest.approx(idx, abs=1e-3) or v == pytest.approx(-idx, abs=1e-3)
        flips.append(v < 0)
        assert torch.allclose(z, torch.full_like(z, z[0, 0, 0].item()))
    assert any(flips) and not all(flips), "both the image and its mirror must be drawn"
    # flip=False always takes the image itself
    cfg = cfg_for(tmp_path, num_workers=0, num_streams=1, flip=False)
    lat = take(build_latent_loader(cfg, micro_batch=16, rank=0, world_size=1, seed=0, latent_size=S), 1)[0]["latent"]
    assert (lat[:, 0, 0, 0] > -1e-3).all()


def test_noise_is_fresh_each_epoch_and_seeded(tmp_path):
    make_shards(tmp_path, [4], logvar=0.0)
    cfg = cfg_for(tmp_path, num_workers=0, num_streams=1, flip=False)
    kw = dict(micro_batch=4, rank=0, world_size=1, latent_size=S)
    e0, e1 = take(build_latent_loader(cfg, **kw, seed=0), 2)
    by_key0 = dict(zip(e0["key"], e0["latent"]))
    by_key1 = dict(zip(e1["key"], e1["latent"]))
    assert set(by_key0) == set(by_key1)
    assert all(not torch.equal(by_key0[k], by_key1[k]) for k in by_key0)
    other = take(build_latent_loader(cfg, **kw, seed=1), 1)[0]
    assert not torch.equal(other["latent"], e0["latent"])


def test_synthetic_resume_and_shapes():
    cfg = DataConfig(shards="synthetic", num_workers=2, synthetic_num_classes=7)
    kw = dict(micro_batch=3, rank=0, world_size=1, seed=5, latent_size=8)
    ref = take(build_latent_loader(cfg, **kw), 5)
    ld = build_latent_loader(cfg, **kw)
    got = take(ld, 3)
    got += take(build_latent_loader(cfg, **kw, state=ld.state_dict()), 2)
    assert_batches_equal(ref, got)
    assert ref[0]["latent"].shape == (3, 4, 8, 8)
    labels = torch.cat([b["label"] for b in ref])
    assert labels.min() >= 0 and labels.max() < 7


def test_layout_and_state_errors(tmp_path):
    make_shards(tmp_path, [3])
    kw = dict(rank=0, world_size=1, seed=0, latent_size=S)
    with pytest.raises(DataError, match="fewer than num_streams = 4"):
        build_latent_loader(cfg_for(tmp_path, num_streams=4), micro_batch=4, **kw)
    with pytest.raises(DataError, match="num_streams = 3 must be divisible by world_size = 2"):
        build_latent_loader(cfg_for(tmp_path, num_streams=3), micro_batch=4, **{**kw, "world_size": 2})
    with pytest.raises(DataError, match="latents are 4x4"):
        build_latent_loader(cfg_for(tmp_path, num_streams=1), micro_batch=1, **{**kw, "latent_size": 32})
    ld = build_latent_loader(cfg_for(tmp_path, num_streams=1, num_workers=0), micro_batch=1, **kw)
    st = ld.state_dict()
    with pytest.raises(DataError, match="seed"):
        build_latent_loader(cfg_for(tmp_path, num_streams=1, num_workers=0), micro_batch=1, **{**kw, "seed": 9}, state=st)
    with pytest.raises(DataError, match="no shard folder, manifest or shard file matches"):
        build_latent_loader(cfg_for(tmp_path / "nope", num_streams=1), micro_batch=1, **kw)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        build_latent_loader(cfg_for(tmp_path, num_streams=1), micro_batch=1, **kw)


def _rewrite_sample(path: Path, key: str, mutate) -> None:
    """Rewrite shard ``path`` with sample ``key``'s members passed through ``mutate(members) -> members``."""
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    own = [(n, d) for n, d in members if n.startswith(key + ".")]
    out = []
    for n, d in members:
        if n.startswith(key + "."):
            if own is not None:
                out += mutate(own)
                own = None
        else:
            out.append((n, d))
    write_tar_atomic(path, out)


def test_faults_are_skipped_counted_and_budgeted(tmp_path):
    keys = make_shards(tmp_path, [6, 6, 6, 6])
    # shard 1: truncated in the middle of its tar; shard 2: one sample without its mean, one NaN latent.
    p1 = tmp_path / "train-000001.tar"
    p1.write_bytes(p1.read_bytes()[: p1.stat().st_size // 2])
    p2 = tmp_path / "train-000002.tar"
    _rewrite_sample(p2, keys[13], lambda ms: [m for m in ms if not m[0].endswith(".mean.npy")])

    def nan_mean(ms):
        mean = np.full((2, 4, S, S), np.nan, np.float32)
        return [m for m in encode_sample(keys[14], mean, np.zeros_like(mean), 0, {})]
    _rewrite_sample(p2, keys[14], nan_mean)
    good = set(keys) - {keys[13], keys[14]}

    cfg = cfg_for(tmp_path, num_streams=2, max_bad_samples=10)
    ld = build_latent_loader(cfg, micro_batch=2, rank=0, world_size=1, seed=0, latent_size=S)
    batches = take(ld, 12)  # one epoch: 24 positions
    seen = [k for b in batches for k in b["key"]]
    assert all(b["latent"].shape == (2, 4, S, S) and torch.isfinite(b["latent"]).all() for b in batches)
    reasons = {(Path(b["url"]).name, b["key"]): b["reason"] for b in ld.bad_samples}
    assert reasons[("train-000002.tar", keys[13])].startswith("missing member(s) mean.npy")
    assert "non-finite" in reasons[("train-000002.tar", keys[14])]
    trunc = [k for (u, k) in reasons if u == "train-000001.tar"]
    assert trunc and all("tar" in reasons[("train-000001.tar", k)] for k in trunc)
    lost = {keys[6 + int(k[1:])] if k.startswith("#") else k for k in trunc}
    assert len(reasons) == 2 + len(lost)
    # every usable sample is seen; the unusable ones are replaced by duplicates of usable ones
    assert len(seen) == 24 and set(seen) == good - lost
    assert len(seen) - len(set(seen)) == 2 + len(lost)

    cfg = cfg_for(tmp_path, num_streams=2, max_bad_samples=1)
    with pytest.raises(DataError, match="more than \\[data\\] max_bad_samples = 1"):
        take(build_latent_loader(cfg, micro_batch=2, rank=0, world_size=1, seed=0, latent_size=S), 6)


def test_unreadable_shard_is_replaced_not_hung(tmp_path):
    keys = make_shards(tmp_path, [4, 4])
    (tmp_path / "train-000000.tar").write_bytes(b"this is not a tar file at all" * 50)
    cfg = cfg_for(tmp_path, num_streams=2, num_workers=2, max_bad_samples=4)
    ld = build_latent_loader(cfg, micro_batch=1, rank=0, world_size=1, seed=0, latent_size=S)
    seen = [k for b in take(ld, 8) for k in b["key"]]
    assert set(seen) == set(keys[4:])
    assert len(ld.bad_samples) == 4 and all("tar unreadable" in b["reason"] for b in ld.bad_samples)


def test_labels_reaching_the_models_null_class_are_refused_before_training(tmp_path):
    """Label == num_classes would silently become the classifier-free guidance null class."""
    make_shards(tmp_path, [6, 5], num_classes=5)  # labels 0..4
    kw = dict(micro_batch=2, rank=0, world_size=1, seed=0, latent_size=S)
    assert take(build_latent_loader(cfg_for(tmp_path), **kw, num_classes=5), 1)
    with pytest.raises(DataError, match=r"labels go up to 4 .*num_classes = 4: label 4 is the classifier-free"):
        build_latent_loader(cfg_for(tmp_path), **kw, num_classes=4)
    man = json.loads((tmp_path / "manifest.json").read_text())  # without histograms: the manifest's num_classes
    for sh in man["shards"]:
        del sh["class_histogram"]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"labels go up to 4 \(from its num_classes\)"):
        build_latent_loader(cfg_for(tmp_path), **kw, num_classes=3)
    with pytest.raises(DataError, match="synthetic_num_classes = 10 is more than"):
        build_latent_loader(DataConfig(shards="synthetic", synthetic_num_classes=10), **kw, num_classes=5)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_batch_is_one_buffer_whose_views_are_its_tensors(workers):
    """A batch with diffusion draws reaches the trainer as one buffer (one shared-memory block from a worker,
    one pin, one device copy): its tensors are views of it, with the values and dtypes a per-tensor batch has."""
    from lamamba_dist.data.batch import Batch, pack, unpack

    cfg = DataConfig(shards="synthetic", num_workers=workers, num_streams=2, synthetic_num_classes=10)
    it = iter(build_latent_loader(cfg, micro_batch=3, rank=0, world_size=1, seed=0, latent_size=4,
                                  num_timesteps=1000))
    b = next(it)
    assert isinstance(b, Batch) and set(b) == {"latent", "label", "key", "t", "noise", "u"}
    dtypes = {k: b[k].dtype for k in ("latent", "label", "t", "noise", "u")}
    assert dtypes == {"latent": torch.float32, "label": torch.long, "t": torch.long, "noise": torch.float32,
                      "u": torch.float32}
    base = b.packed.untyped_storage().data_ptr()
    for k in dtypes:
        assert b[k].untyped_storage().data_ptr() == base, k  # a view of the one buffer
        assert (b[k].data_ptr() - base) % 64 == 0
    assert b["latent"].shape == b["noise"].shape == (3, 4, 4, 4) and b["t"].shape == (3,)
    moved = b.to("cpu")
    assert moved["key"] == b["key"] and all(torch.equal(moved[k], b[k]) for k in dtypes)
    # pack/unpack keep every value and dtype, non-contiguous inputs included
    src = {"a": torch.arange(12.0).view(3, 4).t(), "b": torch.tensor([1, -2], dtype=torch.long),
           "c": torch.tensor([True, False, True])}
    buf, layout = pack(src)
    out = unpack(buf, layout)
    assert buf.dtype == torch.uint8 and all(torch.equal(out[k], src[k]) and out[k].dtype == src[k].dtype for k in src)
