"""Resumable, exactly-once latent loader over the shards written by ``lamamba preprocess``.

Design (every choice below is what makes resume exact and world-size independent):

* The data of one epoch is one seeded sequence: the shards in a permutation drawn from
  (seed, data_seed, epoch), each shard's samples in a permutation drawn from
  (seed, data_seed, epoch, shard). That sequence of T samples is cut into ``num_streams`` contiguous
  ranges, stream s getting samples [s*T//N, (s+1)*T//N). A stream runs forever, epoch after epoch
  (epoch e of stream s = its positions [e*len_s, (e+1)*len_s)), so batches always have their full
  shape and every sample is visited exactly once per epoch. Streams are virtual: their number does
  not depend on the number of shards or workers, so fewer shards than ranks x workers just works
  (streams share shards); only fewer *samples* than streams is an error.
* Rank r owns the streams s with ``s % world_size == r`` and fills its batches one sample at a time,
  always from its least advanced stream (ties: lowest stream id). That rule is memoryless: the
  next samples depend only on the current per-stream positions, and the positions after D draws
  have a closed form (:func:`_waterfill`). So ``state_dict()`` on any rank describes all streams
  (ranks run in lockstep), and a loader rebuilt with ``state=`` continues with exactly the next
  samples, whatever the world size, micro-batch or number of workers.
* When the global batch G is a multiple of N, a global step (all ranks, all accumulation
  micro-steps) is exactly "the next G/N samples of every stream", for any world size: an elastic
  resume sees the same global batches as an uninterrupted run.
* DataLoader workers split a rank's *batches*, not its streams: worker w builds the rank's batches
  j = w, w + nw, ... (nw = max(1, num_workers)), each from the closed-form positions at its start. Each worker
  therefore reads all the shards of the rank's streams (memory ~ streams per rank x shard size per
  worker); samples are decoded only when drawn.
* The latent is drawn from the stored posterior: a generator seeded by (seed, data_seed, epoch, key)
  picks the flip (when ``flip``) and eps; ``z = (mean + exp(logvar / 2) * eps) * scale_factor``.
* Faults never desynchronise ranks: a sample that cannot be used (corrupt or truncated tar, missing
  member, wrong shape, NaN) is replaced by the next usable sample of the same shard (in this
  epoch's order), or of the next shard, so positions still advance by exactly one. Each distinct
  bad sample is counted with its url, key and reason; more than ``max_bad_samples`` on a rank raises.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from lamamba_dist.data.batch import Batch, pack
from lamamba_dist.data.reading import _Bad, check_label_range, parse_sample, read_shard, resolve_shards
from lamamba_dist.data.shards import MANIFEST_NAME
from lamamba_dist.errors import DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs, picklable."""

    kind: str  # "shards" | "synthetic"
    seed: int
    data_seed: int
    num_streams: int
    latent_shape: tuple  # (C, S, S)
    scale: float
    flip: bool
    shards: tuple = ()  # reading.ShardInfo...
    num_classes: int = 1000
    # > 0: each sample also carries its diffusion draws (timestep in [0, draws), noise, class-dropout u)
    draws: int = 0

    @functools.cached_property
    def total(self) -> int:
        return sum(s.count for s in self.shards)

    def stream_len(self, s: int) -> int:
        if self.kind == "synthetic":
            return 1 << 62
        t, n = self.total, self.num_streams
        return (s + 1) * t // n - s * t // n

    def stream_start(self, s: int) -> int:
        return s * self.total // self.num_streams


def _hash64(*parts: Any) -> int:
    h = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _rng(*parts: Any) -> np.random.Generator:
    return np.random.default_rng(_hash64(*parts))


# --------------------------------------------------------------------------- streams (run in workers)


class _Reader:
    """Per-worker: epoch orders, a small shard cache, latent drawing, bad-sample bookkeeping."""

    def __init__(self, plan: Plan, cache_size: int):
        self.plan = plan
        self.cache: OrderedDict[int, list] = OrderedDict()
        self.cache_size = max(2, cache_size)
        self._orders: OrderedDict[int, tuple] = OrderedDict()
        self._wperm: dict[tuple[int, int], np.ndarray] = {}
        self.reported: set = set()
        self.new_bad: list[dict] = []

    def order(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        if epoch not in self._orders:
            perm = _rng("shards", self.plan.seed, self.plan.data_seed, epoch).permutation(len(self.plan.shards))
            starts = [0]
            for i in perm:
                starts.append(starts[-1] + self.plan.shards[i].count)
            self._orders[epoch] = (perm, starts)
            while len(self._orders) > 3:
                self._orders.popitem(last=False)
                self._wperm = {k: v for k, v in self._wperm.items() if k[0] in self._orders}
        return self._orders[epoch]

    def within(self, epoch: int, shard: int) -> np.ndarray:
        k = (epoch, shard)
        if k not in self._wperm:
            n = self.plan.shards[shard].count
            self._wperm[k] = _rng("samples", self.plan.seed, self.plan.data_seed, epoch, shard).permutation(n)
        return self._wperm[k]

    def shard(self, i: int) -> list:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        info = self.plan.shards[i]
        entries = read_shard(info.url, info.count)
        self.cache[i] = entries
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return entries

    def _note(self, shard: int, bad: _Bad) -> None:
        url = self.plan.shards[shard].url
        if (url, bad.key) not in self.reported:
            self.reported.add((url, bad.key))
            self.new_bad.append(dict(url=url, key=bad.key, reason=bad.reason))

    def sample_at(self, epoch: int, g: int) -> dict:
        """Sample number ``g`` of epoch ``epoch``'s sequence (bad ones replaced deterministically)."""
        perm, starts = self.order(epoch)
        p = bisect.bisect_right(starts, g) - 1
        j = g - starts[p]
        nshards = len(perm)
        for dp in range(nshards):
            sid = int(perm[(p + dp) % nshards])
            entries = self.shard(sid)
            w = self.within(epoch, sid)
            n = len(w)
            for dj in range(n):
                i = int(w[(j + dj) % n])
                e = entries[i]
                if isinstance(e, dict) and "__key__" in e:  # raw: decode and check once
                    e = entries[i] = parse_sample(e, self.plan.latent_shape)
                if isinstance(e, _Bad):
                    self._note(sid, e)
                    continue
                return e
        raise DataError("no usable sample in any shard: every sample is unreadable")

    def draw(self, s: int, pos: int) -> tuple[torch.Tensor, int, str]:
        plan = self.plan
        if plan.kind == "synthetic":
            key = f"synthetic-{s:04d}-{pos:012d}"
            g = torch.Generator().manual_seed(_hash64("synthetic", plan.seed, plan.data_seed, key))
            z = torch.randn(plan.latent_shape, generator=g)
            label = int(torch.randint(plan.num_classes, (1,), generator=g))
            return z, label, key
        length = plan.stream_len(s)
        epoch, off = divmod(pos, length)
        e = self.sample_at(epoch, plan.stream_start(s) + off)
        g = torch.Generator().manual_seed(_hash64("latent", plan.seed, plan.data_seed, epoch, e["key"]))
        f = int(torch.randint(2, (1,), generator=g)) if plan.flip else 0
        eps = torch.randn(plan.latent_shape, generator=g)
        mean = torch.from_numpy(e["mean"][f].astype(np.float32))
        std = torch.from_numpy(np.exp(0.5 * e["logvar"][f].astype(np.float32)))
        return (mean + std * eps) * plan.scale, e["label"], e["key"]


def sample_draws(plan: Plan, s: int, pos: int) -> tuple[int, torch.Tensor, float]:
    """(timestep, noise, u) of the sample at position ``pos`` of stream ``s``: seeded by that draw alone.

    A draw position is used once in a whole run (positions only move forward, also across rollbacks and
    resumes), and does not depend on the world size, the micro-batch, the worker or the device.
    """
    g = torch.Generator().manual_seed(_hash64("diffusion-draws", plan.seed, s, pos))
    t = int(torch.randint(plan.draws, (1,), generator=g))
    u = float(torch.rand(1, generator=g))
    noise = torch.randn(plan.latent_shape, generator=g)
    return t, noise, u


def streams_of(num_streams: int, world_size: int, rank: int) -> list[int]:
    return [s for s in range(num_streams) if s % world_size == rank]


def _waterfill(positions: dict[int, int], draws: int) -> dict[int, int]:
    """Positions after ``draws`` picks of the least advanced stream (ties: lowest id), in closed form."""
    if draws == 0 or not positions:
        return dict(positions)

    def cost(level: int) -> int:
        return sum(max(0, level - p) for p in positions.values())

    lo, hi = min(positions.values()), min(positions.values()) + draws  # cost(lo) = 0 <= draws <= cost(hi)
    while lo < hi:  # largest level with cost(level) <= draws
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= draws else (lo, mid - 1)
    out = {s: max(p, lo) for s, p in positions.items()}
    extra = draws - cost(lo)  # < number of streams at level lo: they get one more, lowest ids first
    for s in sorted(s for s, p in out.items() if p == lo)[:extra]:
        out[s] += 1
    return out


def _draws(positions: dict[int, int], n: int) -> list[tuple[int, int]]:
    """The next ``n`` (stream, position) draws of the least-advanced-first rule."""
    heap = [(p, s) for s, p in positions.items()]
    heapq.heapify(heap)
    out = []
    for _ in range(n):
        p, s = heapq.heappop(heap)
        out.append((s, p))
        heapq.heappush(heap, (p + 1, s))
    return out


class _RankStreams(torch.utils.data.IterableDataset):
    """Infinite batches of one rank; worker w of W builds the rank's batches w, w + W, w + 2W..."""

    def __init__(self, plan: Plan, rank: int, world_size: int, nw: int, micro_batch: int, positions: list[int]):
        super().__init__()
        self.plan, self.rank, self.world_size, self.nw = plan, rank, world_size, nw
        self.micro_batch, self.positions = micro_batch, list(positions)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        streams = streams_of(self.plan.num_streams, self.world_size, self.rank)
        base = {s: self.positions[s] for s in streams}
        reader = _Reader(self.plan, cache_size=len(streams) + 2)
        j = wid
        while True:
            start = _waterfill(base, j * self.micro_batch)
            lat, lab, keys, ts, noises, us = [], [], [], [], [], []
            for s, p in _draws(start, self.micro_batch):
                z, y, k = reader.draw(s, p)
                lat.append(z)
                lab.append(y)
                keys.append(k)
                if self.plan.draws:
                    t, n, u = sample_draws(self.plan, s, p)
                    ts.append(t)
                    noises.append(n)
                    us.append(u)
            bad, reader.new_bad = reader.new_bad, []
            tensors = {"latent": torch.stack(lat), "label": torch.tensor(lab, dtype=torch.long)}
            if self.plan.draws:
                tensors.update(t=torch.tensor(ts, dtype=torch.long), noise=torch.stack(noises),
                               u=torch.tensor(us, dtype=torch.float32))
            packed, layout = pack(tensors)
            yield {"_packed": packed, "_layout": layout, "key": keys, "_bad": bad}
            j += self.nw


# --------------------------------------------------------------------------- the loader


class LatentLoader:
    """Iterable of batches (:class:`Batch`) ``{"latent": (B,C,S,S) float32, "label": (B,) long, "key": list[str]}``;
    infinite.

    ``state_dict()`` describes the global position (all streams, all ranks); pass it back to
    :func:`build_latent_loader` as ``state=`` to continue with exactly the next samples.
    Iterating again after a ``break`` also continues where the consumed batches stopped.
    """

    def __init__(self, plan: Plan, *, rank: int, world_size: int, num_workers: int, micro_batch: int,
                 positions: list[int], max_bad_samples: int, prefetch_factor: int = 2, pin_memory: bool = False):
        self.plan = plan
        self.pin_memory = pin_memory
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.nw = max(1, num_workers)
        self.micro_batch = micro_batch
        self.max_bad_samples = max_bad_samples
        self.prefetch_factor = prefetch_factor
        self._positions = list(positions)
        self._consumed = 0
        self.bad_samples: list[dict] = []
        self._bad_seen: set = set()

    # ---- position bookkeeping (pure functions of the number of batches consumed)
    def _positions_after(self, b: int) -> list[int]:
        """Every stream's position after every rank consumed ``b`` more batches (ranks run in lockstep)."""
        out = list(self._positions)
        for r in range(self.world_size):
            streams = streams_of(self.plan.num_streams, self.world_size, r)
            for s, p in _waterfill({s: out[s] for s in streams}, b * self.micro_batch).items():
                out[s] = p
        return out

    def _fold(self) -> None:
        self._positions = self._positions_after(self._consumed)
        self._consumed = 0

    @property
    def positions(self) -> list[int]:
        return self._positions_after(self._consumed)

    @property
    def images_seen(self) -> int:
        """Images consumed globally (all ranks), counted from the start of the run."""
        return sum(self.positions)

    @property
    def epoch(self) -> int:
        """The epoch every stream has reached (streams differ by at most one sample per epoch)."""
        if self.plan.kind == "synthetic":
            return 0
        return min(p // self.plan.stream_len(s) for s, p in enumerate(self.positions))

    @property
    def samples_per_epoch(self) -> Optional[int]:
        return None if self.plan.kind == "synthetic" else self.plan.total

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "kind": self.plan.kind,
            "seed": self.plan.seed,
            "data_seed": self.plan.data_seed,
            "num_streams": self.plan.num_streams,
            "samples_per_epoch": self.samples_per_epoch,
            "positions": self.positions,
            "images_seen": self.images_seen,
            "epoch": self.epoch,
            "layout": {"world_size": self.world_size, "num_workers": self.num_workers, "micro_batch": self.micro_batch},
        }

    # ---- iteration
    def _dataset(self) -> _RankStreams:
        return _RankStreams(self.plan, self.rank, self.world_size, self.nw, self.micro_batch, self._positions)

    def __iter__(self) -> Iterator[dict]:
        self._fold()
        ds = self._dataset()
        if self.num_workers == 0:
            it = iter(ds)
        else:
            it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                                  prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                                  worker_init_fn=_worker_init))
        for raw in it:
            packed = raw.pop("_packed")
            if self.pin_memory and self.num_workers == 0:
                packed = packed.pin_memory()
            self._note_bad(raw.pop("_bad"))
            self._consumed += 1
            yield Batch.from_packed(packed, raw.pop("_layout"), **raw)

    def _note_bad(self, bad: list[dict]) -> None:
        for b in bad:
            if (b["url"], b["key"]) in self._bad_seen:  # several workers may meet the same one
                continue
            self._bad_seen.add((b["url"], b["key"]))
            log.warning("bad sample skipped: %s key %s: %s", b["url"], b["key"], b["reason"])
            self.bad_samples.append(b)
        if len(self.bad_samples) > self.max_bad_samples:
            first = self.bad_samples[0]
            raise DataError(f"{len(self.bad_samples)} bad samples on rank {self.rank}, more than "
                            f"[data] max_bad_samples = {self.max_bad_samples}; first: {first['url']} key "
                            f"{first['key']}: {first['reason']}")


def _worker_init(_worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: Ctrl-C in a terminal reaches them too, and the trainer saves first."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # pragma: no cover
        pass


def _layout_check(n: int, world_size: int) -> None:
    if n % world_size != 0:
        raise DataError(f"[data] num_streams = {n} must be divisible by world_size = {world_size}; set it to a "
                        f"multiple of every world size the run may use (e.g. 64), and of nothing larger than "
                        f"the global batch divides (global_batch % num_streams == 0 keeps global batches identical "
                        f"across world sizes)")


def build_latent_loader(cfg, *, micro_batch: int, rank: int, world_size: int, seed: int, latent_size: int,
                        state: Optional[dict] = None, num_timesteps: int = 0, pin_memory: bool = False,
                        num_classes: Optional[int] = None) -> LatentLoader:
    """The training data loader of one rank (see the module docstring for the guarantees).

    ``cfg`` is the ``[data]`` section (:class:`lamamba_dist.config.DataConfig`). ``cfg.shards ==
    "synthetic"`` gives seeded random latents and labels with the same API. ``num_timesteps > 0``: batches
    also carry each sample's diffusion draws (``t``, ``noise``, ``u``: :func:`sample_draws`), made in the
    worker processes. ``pin_memory``: batches come in pinned host memory (asynchronous copies to the GPU).
    ``num_classes``: the model's; labels must stay below it (:func:`check_label_range`).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size = {world_size})")
    if micro_batch < 1:
        raise DataError(f"micro_batch = {micro_batch}: must be >= 1")
    n = cfg.num_streams or (state["num_streams"] if state else world_size)
    kind = "synthetic" if cfg.shards == "synthetic" else "shards"
    if kind == "synthetic":
        if num_classes is not None and cfg.synthetic_num_classes > num_classes:
            raise DataError(f"[data] synthetic_num_classes = {cfg.synthetic_num_classes} is more than [model] "
                            f"num_classes = {num_classes}: label {num_classes} is the classifier-free guidance null class")
        plan = Plan(kind, seed, cfg.seed, n, (4, latent_size, latent_size), 1.0, cfg.flip,
                    num_classes=cfg.synthetic_num_classes, draws=num_timesteps)
    else:
        man, infos, folder = resolve_shards(cfg.shards)
        if num_classes is not None:
            check_label_range(man, infos, folder, num_classes)
        shape = tuple(man["latent_shape"])  # (2, C, S, S)
        if shape[-1] != latent_size or shape[-2] != latent_size:
            raise DataError(f"{folder / MANIFEST_NAME}: latents are {shape[-2]}x{shape[-1]} (resolution "
                            f"{man.get('resolution')}), the model wants {latent_size}x{latent_size}")
        plan = Plan(kind, seed, cfg.seed, n, tuple(shape[1:]), float(man["scale_factor"]), cfg.flip, tuple(infos),
                    draws=num_timesteps)
        if plan.total < n:
            raise DataError(f"[data] shards = {cfg.shards!r} holds {plan.total} samples, fewer than "
                            f"num_streams = {n}: lower num_streams or add data")
    _layout_check(n, world_size)
    positions = [0] * n
    if state is not None:
        positions = _check_state(state, plan)
    return LatentLoader(plan, rank=rank, world_size=world_size, num_workers=cfg.num_workers, micro_batch=micro_batch,
                        positions=positions, max_bad_samples=cfg.max_bad_samples,
                        prefetch_factor=cfg.prefetch_factor, pin_memory=pin_memory)


def _check_state(state: dict, plan: Plan) -> list[int]:
    def bad(msg: str) -> DataError:
        return DataError(f"cannot resume the data loader: {msg}")

    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise bad(f"state version {state.get('version') if isinstance(state, dict) else state!r}, expected {STATE_VERSION}")
    for key, have in (("kind", plan.kind), ("seed", plan.seed), ("data_seed", plan.data_seed),
                      ("num_streams", plan.num_streams)):
        if state.get(key) != have:
            raise bad(f"it was saved with {key} = {state.get(key)!r}, this run has {have!r}")
    if plan.kind == "shards" and state.get("samples_per_epoch") != plan.total:
        raise bad(f"it was saved over {state.get('samples_per_epoch')} samples per epoch, the shards now hold {plan.total}")
    positions = [int(p) for p in state["positions"]]
    if len(positions) != plan.num_streams or min(positions) < 0:
        raise bad(f"positions {positions[:8]}... do not match num_streams = {plan.num_streams}")
    return positions
