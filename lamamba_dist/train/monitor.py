"""What the user sees: a rank-0 status line per interval, the same in ``stats.jsonl``, and wandb.

wandb is optional and can never stop or stall training: it is imported lazily, every call is guarded,
``init`` runs with a timeout, and the mode is chosen up front (``WANDB_MODE`` if set; otherwise online only
when an API key exists *and* the wandb server answers a 3 s TCP probe; offline otherwise). If online
init fails it falls back to offline; if that fails too, wandb is switched off with one warning. The run id
is created once, stored in every checkpoint and reused on resume (``resume="allow"``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

def peak_tflops(precision: str) -> Optional[float]:
    """The peak used for MFU on this process's GPU (lamamba_dist/flops.py), in ``precision``."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    except Exception:  # pragma: no cover
        return None
    from lamamba_dist.flops import peak_bf16_tflops

    val = peak_bf16_tflops(name)
    if val is None:
        return None
    return val if precision.startswith("bf16") else val / 2  # TF32 tensor cores: half the bf16 rate


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def fmt_num(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-" if x is None else str(x)
    return format(x, spec)


def status_line(rec: dict) -> str:
    """One dense line: step, kimg, loss, grad norm, lr, img/s, TFLOP/s, MFU, peak memory, data-wait share."""
    parts = [
        f"step {rec['step']:>8d}",
        f"kimg {rec['images_seen'] / 1000:>9.1f}",
        f"loss {fmt_num(rec.get('loss'), '.4f')}",
        f"gnorm {fmt_num(rec.get('grad_norm'), '.3f')}",
        f"lr {fmt_num(rec.get('lr'), '.2e')}",
        f"img/s {fmt_num(rec.get('img_per_s'), '.1f')}",
        f"TFLOP/s/gpu {fmt_num(rec.get('tflops_per_gpu'), '.1f')}",
        f"MFU {fmt_num(None if rec.get('mfu') is None else 100 * rec['mfu'], '.1f')}%",
        f"mem {fmt_num(rec.get('peak_mem_gib'), '.1f')}GiB",
        f"data-wait {fmt_num(None if rec.get('data_wait') is None else 100 * rec['data_wait'], '.0f')}%",
    ]
    if rec.get("skipped"):
        parts.append(f"skipped {rec['skipped']}")
    if rec.get("ckpt_blocked_s") is not None:  # a checkpoint was saved since the last line
        parts.append(f"ckpt blocked {rec['ckpt_blocked_s']:.2f}s write {fmt_num(rec.get('ckpt_write_s'), '.1f')}s")
    return " | ".join(parts)


def step_record(step: int, images_seen: int, loss: Optional[float], grad_norm, lr: float, snap: dict, *,
                skipped: int, world: int, flops_per_image: Optional[float], peak_tflops: Optional[float],
                saves: list, on_cuda: bool) -> dict:
    """The record of one log line (the status line, ``stats.jsonl``, wandb): ``loss`` is the mean over the applied
    steps since the last line, ``snap`` a :meth:`Throughput.snapshot`, ``saves`` the checkpoint records published
    since the last line (their blocked and background-write seconds are summed)."""
    import time

    import torch

    rec = {
        "step": step, "images_seen": images_seen, "loss": loss,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "lr": lr, "img_per_s": snap["img_per_s"],
        "sec_per_step": snap["dt"] / max(snap["steps"], 1), "data_wait": snap["data_wait"],
        "skipped": skipped, "world_size": world, "time": time.time(),
    }
    if flops_per_image:
        rec["tflops_per_gpu"] = snap["img_per_s"] * flops_per_image / world / 1e12
        rec["mfu"] = rec["tflops_per_gpu"] / peak_tflops if peak_tflops else None
    if saves:
        rec["ckpt_blocked_s"] = round(sum(r["blocked_s"] + r["wait_s"] for r in saves), 3)
        rec["ckpt_write_s"] = round(sum(r["write_s"] for r in saves), 3)
    if on_cuda:
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        rec["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rec


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True, default=str) + "\n")


def _wandb_reachable(timeout: float = 3.0) -> bool:
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    u = urlparse(url)
    host = u.hostname or "api.wandb.ai"
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _have_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        n = netrc.netrc()
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
        return n.authenticators(host) is not None
    except Exception:
        return False


def choose_wandb_mode() -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "online", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if not _have_api_key():
        return "offline"
    return "online" if _wandb_reachable() else "offline"


def _call_with_timeout(fn, timeout: float):
    """Run ``fn`` in a daemon thread; (True, result) or (False, exception-or-None on timeout)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - wandb raises many types
            box["e"] = e

    th = threading.Thread(target=target, daemon=True, name="wandb-call")
    th.start()
    th.join(timeout)
    if th.is_alive():
        return False, None
    if "e" in box:
        return False, box["e"]
    return True, box.get("r")


class WandbLogger:
    """Guarded wandb run (rank 0 only). ``self.run is None`` when wandb is off or failed."""

    def __init__(self, log_cfg, run_dir: Path, run_id: str, config: dict, log=print, init_timeout: float = 90.0):
        self.run = None
        self.mode = "disabled"
        self.run_id = run_id
        self._log = log
        try:
            import wandb  # noqa: F401
        except Exception as e:
            log(f"wandb: not available ({e.__class__.__name__}); continuing without it")
            return
        mode = choose_wandb_mode()
        if mode == "disabled":
            return
        wdir = Path(os.environ.get("WANDB_DIR", run_dir))
        wdir.mkdir(parents=True, exist_ok=True)
        tried = [mode] + (["offline"] if mode == "online" else [])
        for m in tried:
            ok, res = _call_with_timeout(lambda m=m: self._init(log_cfg, wdir, run_id, config, m, init_timeout),
                                         init_timeout + 10)
            if ok and res is not None:
                self.run, self.mode = res, m
                log(f"wandb: run {run_id} ({m}) in {wdir}")
                return
            log(f"wandb: {m} init failed ({res!r}); " + ("trying offline" if m == "online" else "continuing without wandb"))

    @staticmethod
    def _init(log_cfg, wdir, run_id, config, mode, timeout):
        import wandb

        settings = wandb.Settings(init_timeout=timeout, silent=True, console="off")
        return wandb.init(
            project=log_cfg.project, entity=log_cfg.entity or None, name=log_cfg.run_name or None,
            id=run_id, resume="allow", dir=str(wdir), config=config, mode=mode, settings=settings,
        )

    def log(self, rec: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            data = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.run.log(data, step=step)
        except Exception as e:  # never let wandb stop training
            self._log(f"wandb: log failed ({e!r}); switching wandb off")
            self.run = None

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.run is None:
            return
        try:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)
        except Exception as e:  # never let wandb stop training
            self._log(f"wandb: image log failed ({e!r}); switching wandb off")
            self.run = None

    def finish(self, timeout: float = 60.0) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        ok, res = _call_with_timeout(run.finish, timeout)
        if not ok:
            self._log(f"wandb: finish did not complete ({res!r}); local files are kept in {run.dir if hasattr(run, 'dir') else '?'}")


class Throughput:
    """Timers for img/s and the data-wait share between two log points."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0
        self.steps = 0

    def snapshot(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"dt": dt, "img_per_s": self.images / dt, "data_wait": min(self.data_wait / dt, 1.0), "steps": self.steps}


@dataclass
class LoopMetrics:
    """What the training loop shows between steps (lamamba_dist/train/trainer.py ``Trainer.run``): the status line
    and ``stats.jsonl`` (rank 0), wandb, the progress bar, the throughput meter, and the losses of the steps applied
    since the last line."""

    stats: Optional[JsonlWriter]
    wb: Optional[WandbLogger]
    bar: Any
    meter: Throughput
    peak: Optional[float]
    steps_this_run: int = 0
    loss_acc: float = 0.0  # the applied steps' losses since the last log line: their sum and count
    n_acc: int = 0

    @classmethod
    def open(cls, *, run_dir: Path, is_main: bool, log_cfg, run_id: str, config: dict, steps: int, initial: int,
             precision: str, log=print) -> "LoopMetrics":
        from tqdm import tqdm

        stats = JsonlWriter(run_dir / "stats.jsonl") if is_main else None
        wb = WandbLogger(log_cfg, run_dir, run_id, config, log=log) if is_main and log_cfg.wandb else None
        bar = tqdm(total=steps, initial=initial, disable=not is_main, desc="train", unit="step", dynamic_ncols=True,
                   mininterval=2.0, file=sys.stderr)
        return cls(stats=stats, wb=wb, bar=bar, meter=Throughput(), peak=peak_tflops(precision))

    def add_loss(self, loss: float) -> None:
        self.loss_acc += loss
        self.n_acc += 1

    def log(self, step: int, images_seen: int, snap: dict, grad_norm, lr: float, *, skipped: int, world: int,
            flops_per_image: Optional[float], saves: list, on_cuda: bool, is_main: bool) -> dict:
        """One interval's record (``snap``: the meter's snapshot at its end): the status line, ``stats.jsonl`` and
        wandb on rank 0; the interval's losses and meter start again."""
        rec = step_record(step, images_seen, self.loss_acc / self.n_acc if self.n_acc else None, grad_norm, lr, snap,
                          skipped=skipped, world=world, flops_per_image=flops_per_image, peak_tflops=self.peak,
                          saves=saves, on_cuda=on_cuda)
        if is_main:
            self.bar.write(status_line(rec), file=sys.stderr)
            self.stats.write(rec)
            if self.wb:
                self.wb.log(rec, step)
        self.loss_acc = 0.0
        self.n_acc = 0
        self.meter.reset()
        return rec

    def close(self) -> None:
        self.bar.close()
        if self.wb:
            self.wb.finish()
