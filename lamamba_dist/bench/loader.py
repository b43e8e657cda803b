"""``lamamba bench loader`` (alias ``lamamba bench-loader``): latent loader throughput (samples/s, per worker) on CPU.

Without ``--shards`` it writes a temporary shard set of random posteriors at the requested
resolution (the format of ``lamamba preprocess``), so the number measures tar reading, npy decoding,
the posterior draw and collation, not the disk. Each configuration is measured after a warm-up.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lamamba_dist.bench.common import environment, write_json


def make_random_shards(folder: Path, num_samples: int, shard_size: int, resolution: int, seed: int = 0) -> Path:
    import numpy as np

    from lamamba_dist.data.shards import encode_sample, sample_key, shard_name, write_json_atomic, write_tar_atomic

    s = resolution // 8
    rng = np.random.default_rng(seed)
    shards = []
    for si, a in enumerate(range(0, num_samples, shard_size)):
        members = []
        for i in range(a, min(num_samples, a + shard_size)):
            mean = rng.standard_normal((2, 4, s, s), dtype=np.float32) * 5
            logvar = rng.normal(-5, 1, (2, 4, s, s)).astype(np.float32)
            members += encode_sample(sample_key(i, "n0", f"r{i}"), mean, logvar, i % 1000, {"label": i % 1000})
        name = shard_name("bench", si)
        sha, size = write_tar_atomic(folder / name, members)
        shards.append({"name": name, "count": min(num_samples, a + shard_size) - a, "sha256": sha, "bytes": size})
    write_json_atomic(folder / "manifest.json", {"format_version": 1, "shards": shards, "scale_factor": 0.18215,
                                                 "latent_shape": [2, 4, s, s], "resolution": resolution,
                                                 "complete": True})
    return folder


def bench_loader(shards: str, latent_size: int, workers: list[int], micro_batch: int, batches: int,
                 warmup: int = 2) -> list[dict]:
    import itertools

    from lamamba_dist.config import DataConfig
    from lamamba_dist.data import build_latent_loader

    results = []
    for nw in workers:
        cfg = DataConfig(shards=shards, num_workers=nw, num_streams=max(1, nw))
        loader = build_latent_loader(cfg, micro_batch=micro_batch, rank=0, world_size=1, seed=0, latent_size=latent_size)
        it = iter(loader)
        for _ in itertools.islice(it, warmup):
            pass
        t0 = time.perf_counter()
        n = 0
        for b in itertools.islice(it, batches):
            n += len(b["key"])
        dt = time.perf_counter() - t0
        results.append({"num_workers": nw, "micro_batch": micro_batch, "samples": n, "seconds": dt,
                        "samples_per_s": n / dt, "samples_per_s_per_worker": n / dt / max(1, nw)})
        del it
    return results


def add_parser(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description="Measure latent loader samples/s (total and per worker) on "
                       "CPU, on --shards or on temporary random shards, and print JSON.")
    p.add_argument("--shards", default=None, help="shard folder (default: temporary random shards)")
    p.add_argument("--resolution", type=int, default=256, choices=(256, 512))
    p.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values to measure")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=40, help="measured batches per configuration")
    p.add_argument("--samples", type=int, default=2048, help="size of the temporary shard set")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--out", default=None, help="write the JSON result here too")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import os

    from lamamba_dist.errors import CLIError

    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        raise CLIError(f"--workers {args.workers!r}: expected comma-separated integers") from None
    if not workers or min(workers) < 0 or args.micro_batch < 1 or args.batches < 1:
        raise CLIError("--workers must list integers >= 0; --micro-batch and --batches must be >= 1")
    with tempfile.TemporaryDirectory(prefix="lamamba-bench-loader-") as tmp:
        shards = args.shards
        if shards is None:
            shards = str(make_random_shards(Path(tmp), args.samples, args.shard_size, args.resolution))
        res = bench_loader(shards, args.resolution // 8, workers, args.micro_batch, args.batches)
    out = {"bench": "loader", "environment": environment("cpu"), "resolution": args.resolution, "shards": args.shards or f"random ({args.samples} samples)",
           "cpu_count": os.cpu_count(), "torch_threads_main": __import__("torch").get_num_threads(), "results": res}
    print(write_json(args.out, out, indent=1))
    return 0
