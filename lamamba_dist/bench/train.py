"""`lamamba bench train` (alias `lamamba bench-train`): the trainer's real training step, measured for a list of
configurations in ONE launch.

One process group (torchrun with N ranks, or a plain call = a 1-rank group, as ``lamamba train``) runs every
configuration of a matrix one after another. Each configuration is built by the trainer itself
(:class:`lamamba_dist.train.trainer.Trainer` with ``resume=False``: the registry model with its
``arch_overrides``, the DeepSpeed config of ds_config.py, bf16, activation checkpointing flag, synthetic latents
from the real loader) and stepped with :meth:`Trainer.train_step` (per-sample draws, diffusion loss, backward,
the per-step all-reduce, ``engine.step()``, EMA update). No checkpoint is written and wandb stays off.
Between configurations the engine is destroyed and memory freed (``gc.collect()``, ``empty_cache()``, peak
statistics reset).

Timing: ``--warmup`` optimizer steps, then ``--steps`` timed ones between two ``torch.cuda.synchronize()`` +
barrier pairs (wall clock on CPU); the slowest rank's time counts. Global batch = micro x accum x world size.
A configuration that fails (CUDA OOM, an impossible setting) becomes a row with ``"error"``; every rank learns
of a failure at the end of the build and of the measurement (one ``all_gather_object`` each), so the ranks
stay in step when they fail together, as OOMs under ZeRO do (every rank runs the same shapes). A failure on one
rank alone in the middle of a collective cannot be recovered in-process: the launch then hangs until NCCL's
timeout (wrap launches in ``timeout``; the JSON is rewritten after every row, so finished rows survive).

``--fit-batch``: per configuration, peak memory (``max_memory_allocated``, max over ranks) at the
``--fit-probes`` micro-batches on one engine, a straight line ``peak = static + per_sample * micro`` through
them, the largest micro-batch under the GPU's memory minus ``--fit-margin-gib``, then a verification run at
that micro-batch (stepping down by 10% per OOM, on a rebuilt engine), whose throughput is reported.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from lamamba_dist.bench.common import environment, error_kind, short_error, write_json
from lamamba_dist.bench.fit import add_fit_arguments, fit_row
from lamamba_dist.bench.matrix import AXES, expand

GIB = 2**30
# Test hook: LAMAMBA_BENCH_FAKE_MEMORY="static,per_sample[,quadratic]" (GiB) makes the peak memory of a step
# static + per_sample * micro + quadratic * micro^2 and raises an OOM above --gpu-memory-gib (CPU tests of --fit-batch).
FAKE_MEMORY_ENV = "LAMAMBA_BENCH_FAKE_MEMORY"


# --------------------------------------------------------------------------- the sweep


def model_label(cfg) -> str:
    m = cfg.model
    if not m.arch_overrides:
        return m.name
    return m.name + "[" + ",".join(f"{k}={v}" for k, v in sorted(m.arch_overrides.items())) + "]"


class BenchTrain:
    """One per process: owns the process group and runs the rows one after another."""

    def __init__(self, args):
        import torch
        import torch.distributed as dist

        from lamamba_dist.distributed import ensure_dist_env, init_device_and_process_group

        self.args = args
        ensure_dist_env()
        self.on_cuda, self.device = init_device_and_process_group()  # the trainer's own setup (TF32 on GPUs)
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.trainer = None
        self.results: list[dict] = []
        self.scratch = tempfile.mkdtemp(prefix="lamamba_bench_train_")  # [checkpoint] dir: never written (no resume)
        fake = os.environ.get(FAKE_MEMORY_ENV)
        self.fake_memory = [float(x) for x in fake.split(",")] if fake else None
        if self.fake_memory is not None:
            self.fake_memory += [0.0] * (3 - len(self.fake_memory))
        self._fake_peak = 0.0
        self._micro = 0
        if args.gpu_memory_gib:
            self.capacity_gib = float(args.gpu_memory_gib)
        elif self.on_cuda:
            self.capacity_gib = torch.cuda.get_device_properties(self.device).total_memory / GIB
        else:
            self.capacity_gib = None
        if args.peak_tflops:
            self.peak_tflops = args.peak_tflops
        else:
            try:
                from lamamba_dist.bench.model import device_peak_tflops
            except ImportError:  # pragma: no cover
                from lamamba_dist.train.monitor import peak_tflops as _pt

                def device_peak_tflops(_dev):
                    return _pt("bf16")
            self.peak_tflops = device_peak_tflops(self.device)
        self.environment = self._environment()

    # ------------------------------------------------------------------ bookkeeping
    def _environment(self) -> dict:
        return environment(self.device, world_size=self.world, command=self._command(), peak_tflops=self.peak_tflops,
                           gpu_memory_gib=self.capacity_gib)

    def _command(self) -> str:
        """How to rerun this launch (argv after the program, behind the launcher for this world size)."""
        import shlex

        launcher = ("python3 -m lamamba_dist.cli" if self.world == 1 else
                    f"python3 -m torch.distributed.run --standalone --nproc_per_node {self.world} -m lamamba_dist.cli")
        args = sys.argv[1:]
        for i, a in enumerate(args):
            if a == "bench-train" or (a == "bench" and args[i + 1:i + 2] == ["train"]):
                return launcher + " " + shlex.join(args[i:])
        return launcher + " bench train ..."  # called as a library

    def _write(self) -> None:
        if not self.is_main:
            return
        write_json(self.args.out, {"bench": "train", "environment": self.environment,
                                   "settings": {k: v for k, v in vars(self.args).items() if k != "func"},
                                   "results": self.results}, indent=1)

    def _agree(self, local: dict) -> list[dict]:
        """Collective: every rank's ``local`` dict, on every rank."""
        if self.world == 1:
            return [local]
        out: list = [None] * self.world
        self.dist.all_gather_object(out, local)
        return out

    @staticmethod
    def _first_error(parts: list[dict]) -> Optional[str]:
        errs = [f"rank {r}: {p['error']}" if len(parts) > 1 else p["error"] for r, p in enumerate(parts) if p.get("error")]
        return errs[0] if errs else None

    def _sync(self) -> None:
        import torch

        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def _free(self) -> None:
        """Destroy the engine of the current trainer (if any) and give its memory back."""
        import torch

        tr, self.trainer = self.trainer, None
        if tr is not None:
            try:
                if tr.ema is not None:
                    tr.ema.join()  # a queued EMA update reads memory freed below
                tr.engine.destroy()
            except Exception:  # pragma: no cover
                pass
            tr.engine = tr.ema = tr.loader = tr.diffusion = None
            del tr
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    # ------------------------------------------------------------------ config of one row
    def make_config(self, path: str, combo: dict[str, str], micro: Optional[int] = None):
        """The experiment config of one row (raises ConfigError). Global batch = micro x accum x world size."""
        from lamamba_dist.config import load_config

        sets = ['data.shards="synthetic"', "logging.wandb=false", f'checkpoint.dir="{self.scratch}"',
                *self.args.overrides]
        for axis, value in combo.items():
            if axis not in ("accum", "micro"):
                sets.append(f"{AXES.get(axis, axis)}={value}")
        try:
            accum = int(combo.get("accum", self.args.accum))
            if micro is None:
                micro = int(combo["micro"]) if "micro" in combo else self.args.micro_batch
        except ValueError:
            raise ValueError(f"matrix {combo}: micro and accum must be integers") from None
        if micro is None:  # the config's own (valid together with its global batch)
            micro = load_config(path, sets).train.micro_batch
        return load_config(path, sets + [f"train.micro_batch={micro}",
                                         f"train.global_batch={micro * accum * self.world}"])

    def _row_base(self, path: str, combo: dict[str, str], cfg=None) -> dict:
        row: dict[str, Any] = {"config": Path(path).stem, "matrix": dict(combo), "world_size": self.world}
        if cfg is not None:
            t = cfg.train
            row.update(model=model_label(cfg), resolution=cfg.model.resolution, zero_stage=t.zero_stage,
                       grad_checkpointing=cfg.model.grad_checkpointing, precision=t.precision,
                       micro_batch=t.micro_batch, accum=t.global_batch // (t.micro_batch * self.world),
                       global_batch=t.global_batch)
        return row

    # ------------------------------------------------------------------ build + measure (collective)
    def _build(self, cfg) -> tuple[Optional[str], float]:
        """Build a Trainer for ``cfg`` into ``self.trainer``; returns (agreed error, seconds)."""
        from lamamba_dist.train.trainer import Trainer

        t0 = time.perf_counter()
        err = None
        try:
            self.trainer = Trainer(cfg, resume=False, init_on_device=self.args.init_on == "device")
            # the pinned memory of background saves is allocated in a thread once the trainer is built; the
            # steps taken meanwhile are slower (a start-up cost of training, not its steady speed)
            self.host_buffers_wait_s = self.trainer.ckpt.wait_host_buffers(timeout=600)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error row
            err = short_error(e)
        build_s = time.perf_counter() - t0
        err = self._first_error(self._agree({"error": err}))
        if err:
            self._free()
        return err, build_s

    def _use_micro_batch(self, micro: int) -> None:
        """Feed the current engine micro-batches of ``micro`` samples (fit probes; the engine does not depend on it)."""
        tr = self.trainer
        tr.loader = tr.build_loader(micro)
        self._micro = micro

    def _step(self, it, settle: bool = False) -> list[dict]:
        """One trainer step as the training loop runs a step with nothing due (settled with the next one: see
        ``Trainer.queue_step``), or settled at once with ``settle``; returns the results settled by the call."""
        import torch

        if self.fake_memory is not None:
            a, b, c = self.fake_memory
            peak = a + b * self._micro + c * self._micro**2
            if self.capacity_gib is not None and peak > self.capacity_gib:
                raise torch.cuda.OutOfMemoryError(f"fake: {peak:.2f} GiB needed at micro-batch {self._micro}, "
                                                  f"{self.capacity_gib:.2f} GiB available")
            self._fake_peak = max(self._fake_peak, peak)
        from lamamba_dist.train.faults import fault_hit

        if fault_hit("bench_oom", len(self.results)):  # test hook: LAMAMBA_FAULT=bench_oom:ROW[:RANK]
            raise torch.cuda.OutOfMemoryError(f"planted OOM (LAMAMBA_FAULT) in row {len(self.results)}")
        tr = self.trainer
        done = tr.queue_step(it, defer=True)
        if settle:
            done += tr.settle()
        tr.step += len(done)
        return done

    def _peak(self) -> tuple[Optional[float], Optional[float]]:
        import torch

        if self.fake_memory is not None:
            return self._fake_peak, None
        if self.on_cuda:
            return (torch.cuda.max_memory_allocated(self.device) / GIB,
                    torch.cuda.max_memory_reserved(self.device) / GIB)
        return None, None

    def _measure(self, warmup: int, steps: int) -> dict:
        """Collective: warm-up + timed steps on ``self.trainer``; every rank gets the merged result."""
        import torch

        local: dict[str, Any] = {"error": None}
        tr = self.trainer
        it = None
        try:
            self._fake_peak = 0.0
            if self.on_cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            it = iter(tr.loader)
            skipped = 0
            reasons: set = set()
            t0 = time.perf_counter()
            done: list[dict] = []
            for i in range(warmup):
                done += self._step(it, settle=i in (0, warmup - 1))
                if i == 0:
                    self._sync()
                    local["first_step_s"] = time.perf_counter() - t0
            self._sync()
            if self.world > 1:
                self.dist.barrier()
            t0 = time.perf_counter()
            for i in range(steps):
                done += self._step(it, settle=i == steps - 1)
            self._sync()
            for res in done:
                skipped += not res["applied"]
                reasons.add(res.get("nonfinite"))
            loss = done[-1]["loss_sum"] / (tr.accum * self.world) if done else None
            local["elapsed"] = time.perf_counter() - t0
            local["peak_gib"], local["peak_reserved_gib"] = self._peak()
            local["loss"] = loss
            local["skipped"] = skipped
            local["nonfinite"] = sorted(r for r in reasons if r)
            if getattr(self.args, "profile", 0):
                local["profile"] = self._profile(it, self.args.profile)
            if getattr(self.args, "host_profile", 0):
                local["host_profile"] = self._host_profile(it, self.args.host_profile)
        except Exception as e:  # noqa: BLE001 - OOM and friends become error rows
            local = {"error": short_error(e)}
        finally:
            if it is not None:
                it.close()  # stops the loader's worker processes
            del it
        if local["error"]:
            self._free()  # this rank's memory back before the (small) collective below
        parts = self._agree(local)
        err = self._first_error(parts)
        if err:
            self._free()
            return {"error": err}
        peaks = [p["peak_gib"] for p in parts if p.get("peak_gib") is not None]
        reserved = [p["peak_reserved_gib"] for p in parts if p.get("peak_reserved_gib") is not None]
        return {"elapsed": max(p["elapsed"] for p in parts), "first_step_s": parts[0].get("first_step_s"),
                "peak_gib": max(peaks) if peaks else None, "peak_reserved_gib": max(reserved) if reserved else None,
                "loss": parts[0]["loss"], "skipped_steps": parts[0]["skipped"], "profile": parts[0].get("profile"),
                "host_profile": parts[0].get("host_profile"),
                "nonfinite": parts[0].get("nonfinite")}

    def _profile(self, it, steps: int) -> dict:
        """torch.profiler over ``steps`` more trainer steps (lamamba_dist/bench/profiling.py ``profile_steps``)."""
        from lamamba_dist.bench.profiling import profile_steps

        prof = profile_steps(lambda: self._step(it), steps, self.device)
        self._step(it, settle=True)  # the last profiled step is settled with this one
        return prof

    def _host_profile(self, it, steps: int) -> dict:
        """The host sampled over ``steps`` more trainer steps (lamamba_dist/bench/profiling.py ``host_profile``)."""
        from lamamba_dist.bench.profiling import host_profile

        prof = host_profile(lambda: self._step(it), steps, self.device)
        self._step(it, settle=True)
        return prof

    def _throughput(self, m: dict, micro: int, accum: int, steps: int) -> dict:
        per_step = m["elapsed"] / steps
        img_s = micro * accum * self.world / per_step
        out = {"img_per_s_per_gpu": img_s / self.world, "img_per_s": img_s, "step_ms": per_step * 1e3,
               "peak_gib": m["peak_gib"], "peak_reserved_gib": m["peak_reserved_gib"],
               "first_step_s": m["first_step_s"], "final_loss": m["loss"], "skipped_steps": m["skipped_steps"],
               "profile": m.get("profile"), "host_profile": m.get("host_profile"), "nonfinite": m.get("nonfinite") or None,
               "model_tflops_per_gpu": None, "mfu": None}
        fpi = getattr(self.trainer, "flops_per_image", None) if self.trainer is not None else None
        if fpi:
            out["model_tflops_per_gpu"] = img_s / self.world * fpi / 1e12
            out["mfu"] = out["model_tflops_per_gpu"] / self.peak_tflops if self.peak_tflops else None
        return out

    # ------------------------------------------------------------------ rows
    def run_row(self, path: str, combo: dict[str, str]) -> dict:
        from lamamba_dist.config import ConfigError

        t_row = time.perf_counter()
        try:
            cfg = self.make_config(path, combo)
        except (ConfigError, ValueError) as e:  # identical on every rank: no collective needed
            return {**self._row_base(path, combo), "error": short_error(e), "error_kind": "config"}
        row = self._row_base(path, combo, cfg)
        row.update(steps=self.args.steps, warmup=self.args.warmup)
        self._micro = cfg.train.micro_batch
        row["memory_before_gib"] = self._allocated_gib()  # > 0: something of an earlier row was not freed
        self.host_buffers_wait_s = None
        err, row["build_s"] = self._build(cfg)
        row["host_buffers_wait_s"] = self.host_buffers_wait_s
        if not err:
            row["params"] = sum(p.numel() for p in self.trainer.engine.module.parameters())
            m = self._measure(self.args.warmup, self.args.steps)
            err = m.get("error")
            if not err:
                row.update(self._throughput(m, row["micro_batch"], row["accum"], self.args.steps))
                self._own_peak(row)
        self._free()
        if err:
            row.update(error=err, error_kind=error_kind(err))
        row["memory_after_free_gib"] = self._allocated_gib()
        row["wall_s"] = time.perf_counter() - t_row
        return row

    @staticmethod
    def _own_peak(row: dict) -> None:
        """Peak memory of the row itself: what an earlier row left allocated (DeepSpeed's ZeRO-3 engine keeps
        some after ``destroy()``) is subtracted; the process's own peaks are kept as ``*_process``."""
        before = row.get("memory_before_gib") or 0.0
        for key in ("peak_gib", "peak_reserved_gib"):
            if row.get(key) is not None:
                row[f"{key}_process"] = row[key]
                row[key] = row[key] - before

    def _allocated_gib(self) -> Optional[float]:
        import torch

        return torch.cuda.memory_allocated(self.device) / GIB if self.on_cuda else None

    def fit_row(self, path: str, combo: dict[str, str]) -> dict:
        """Largest micro-batch of one configuration (lamamba_dist/bench/fit.py)."""
        return fit_row(self, path, combo)

    def run(self, rows: list[tuple[str, dict[str, str]]]) -> list[dict]:
        self._write()
        for path, combo in rows:
            row = self.fit_row(path, combo) if self.args.fit_batch else self.run_row(path, combo)
            self.results.append(row)
            self._write()
            if self.is_main:
                print(summary_line(row), flush=True)
        return self.results

    def close(self) -> None:
        self._free()
        try:
            os.rmdir(self.scratch)
        except OSError:
            pass
        if self.dist.is_initialized():
            try:
                self.dist.barrier()
            finally:
                self.dist.destroy_process_group()


def _fmt(x, spec: str, unit: str = "") -> str:
    return "n/a" if x is None else f"{format(x, spec)}{unit}"


def summary_line(r: dict) -> str:
    """One short line per configuration."""
    head = (f"{r.get('model', r['config'])} {r.get('resolution', '?')}px ZeRO-{r.get('zero_stage', '?')} "
            f"gc={'on' if r.get('grad_checkpointing') else 'off'} micro {r.get('micro_batch', '?')} "
            f"x{r['world_size']} GPU")
    if r.get("fit"):
        fit = (f" | fit: static {_fmt(r.get('static_gib'), '.1f')} GiB + {_fmt(r.get('per_sample_gib'), '.3f')} "
               f"GiB/sample -> predicted {r.get('predicted_micro_batch')}, verified {r.get('fit_micro_batch')}")
    else:
        fit = ""
    if r.get("error"):
        return f"[bench-train] {head}: ERROR {r['error'][:200]}{fit}"
    return (f"[bench-train] {head}: {r['img_per_s_per_gpu']:.1f} img/s/GPU ({r['img_per_s']:.1f} total), "
            f"{r['step_ms']:.0f} ms/step, peak {_fmt(r.get('peak_gib'), '.1f', ' GiB')}, "
            f"MFU {_fmt(None if r.get('mfu') is None else 100 * r['mfu'], '.1f', '%')}{fit}")


# --------------------------------------------------------------------------- CLI


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="TOML",
                   help="experiment TOML (repeatable: a matrix without a config axis runs on each)")
    p.add_argument("--matrix", action="append", default=[], metavar="SPEC",
                   help='axes "name=v1,v2;name=v1,..." (cartesian product, repeatable: rows in order). Names: '
                        + ", ".join(f"{k} ({v})" for k, v in AXES.items())
                        + ', accum, config (a TOML path), or any section.key. Example: "zero=1,2,3;gc=false,true"')
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value for every row (TOML syntax), as for `lamamba train`")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="per-GPU micro-batch for rows without a micro axis (default: the config's)")
    p.add_argument("--accum", type=int, default=1,
                   help="gradient accumulation steps: global batch = micro x accum x world size (default 1)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them (>= 1)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, N more under torch.profiler: CPU and device time per step, kernel "
                        "launches and the top CPU operators in the JSON (rank 0's)")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="after the timed steps (and --profile's), N more with the host sampled instead (far cheaper "
                        "than torch.profiler): the main thread's wall time by Python line, GC time, host syncs and "
                        "their lines (in the JSON, rank 0's)")
    p.add_argument("--out", default=None, help="JSON file (rank 0), rewritten after every configuration")
    p.add_argument("--init-on", choices=("device", "cpu"), default="device",
                   help="build the model on the GPU (default: fast; other initial weights than training's CPU "
                        "build, same seed) or on the CPU as `lamamba train` does")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak used for MFU (default: by GPU name)")
    add_fit_arguments(p)
    p.set_defaults(func=_run)
    return p


def _run(args) -> int:
    import logging

    from lamamba_dist.errors import CLIError

    try:
        rows = expand(args.config, args.matrix)
    except ValueError as e:
        raise CLIError(str(e)) from None
    for path in {p for p, _ in rows}:
        if not Path(path).is_file():
            raise CLIError(f"config file not found: {path}")
    if args.steps < 1 or args.warmup < 1 or args.accum < 1 or (args.micro_batch is not None and args.micro_batch < 1):
        raise CLIError("--steps, --warmup, --accum and --micro-batch must be >= 1")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    bench = BenchTrain(args)
    try:
        if bench.is_main:
            print(f"[bench-train] {len(rows)} configuration(s) on {bench.world} rank(s), "
                  f"{bench.environment.get('gpu', bench.device.type)}", flush=True)
        bench.run(rows)
    finally:
        bench.close()
    return 0
