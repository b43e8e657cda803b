"""Trainer step time with the non-finite skip on the device vs on the host, in one process (one engine).

Alternating blocks of steps (device, host, device, host, ...) on the same trainer, so that clock drift and
warm-up do not favour either; prints one JSON line. The device-side skip (lamamba_dist/train/nonfinite.py)
reads the step's verdict after ``engine.step()`` is queued, the host-side one before it.

    python scripts/skip_ab.py --config configs/lamamba_XL_256.toml [--set train.compile=true] [--micro 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from lamamba_dist.config import load_config
from lamamba_dist.train.trainer import Trainer

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--set", dest="overrides", action="append", default=[])
ap.add_argument("--micro", type=int, default=32)
ap.add_argument("--warmup", type=int, default=5)
ap.add_argument("--steps", type=int, default=10, help="steps per block")
ap.add_argument("--blocks", type=int, default=4, help="blocks per mode")
a = ap.parse_args()
os.environ.setdefault("WANDB_MODE", "disabled")
scratch = tempfile.mkdtemp(prefix="skip_ab_")
cfg = load_config(a.config, ['data.shards="synthetic"', "logging.wandb=false", f'checkpoint.dir="{scratch}"',
                             f"train.micro_batch={a.micro}", f"train.global_batch={a.micro}", *a.overrides])
tr = Trainer(cfg, resume=False)
on_cuda = torch.cuda.is_available()
sync = torch.cuda.synchronize if on_cuda else (lambda: None)
it = iter(tr.loader)
for _ in range(a.warmup):
    tr.train_step(it)
sync()
times: dict[str, list[float]] = {"device": [], "host": []}
for _ in range(a.blocks):
    for mode in ("device", "host"):
        if tr.guard.use_device_skip(mode == "device") != (mode == "device"):
            raise SystemExit(f"this optimizer ({tr.guard.kind}) has no device-side skip")
        tr.train_step(it)  # the first step of a block: the switch
        sync()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            tr.train_step(it)
        sync()
        times[mode].append((time.perf_counter() - t0) / a.steps * 1e3)
it.close()
tr.close()
res = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
print(json.dumps({"config": a.config, "micro_batch": a.micro, "overrides": a.overrides,
                  "device_skip_ms": res["device"], "host_skip_ms": res["host"],
                  "device_over_host": res["device"] / res["host"], "blocks_ms": times}))
