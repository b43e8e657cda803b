"""Non-finite steps: one fused check per step on the device, and skipping the optimizer step on every rank.

The check (:meth:`NonFiniteGuard.check`) runs once per optimizer step, after the last micro-batch's
backward and before ``engine.step()``; :meth:`NonFiniteGuard.finish` after it returns the verdict:

* the loss summed over the step's micro-batches stays on the device (no sync per micro-batch);
* the squared L2 norm of this rank's reduced gradients is one ``torch._foreach_norm`` over them;
* (loss sum, grad sum of squares, stop flag) are stacked into one device tensor, all-reduced once
  (the step's only collective of our own) and read once: the step's one host sync.

A step is *non-finite* when the global loss sum or the global grad norm is not finite; every rank then
sees the same verdict and skips the optimizer step (weights, EMA, Adam state and LR schedule unchanged).

Where the optimizer is torch's fused Adam/AdamW under ZeRO-0/1/2 (the default on GPUs and CPUs), the skip
happens on the device: the verdict is written into the optimizer's ``found_inf`` tensor (torch's own
mechanism for skipping a fused step, the one ``GradScaler`` uses), ``engine.step()`` is queued without
waiting, and the verdict is read in :meth:`finish`, after the whole step has been queued. A host read before
``engine.step()`` would drain the device queue there and leave the device idle while the host runs the
optimizer's Python (the per-parameter work of ZeRO's step); read after it, it costs only the wait for work
already queued. After a device-side skip, :meth:`finish` restores DeepSpeed's bookkeeping of a skipped step
(its skipped-step count, the LR schedule, ``engine.was_step_applied()``). Other optimizers (ZeRO-3,
DeepSpeed's BF16_Optimizer, CPU-offloaded Adam) read the verdict in :meth:`check` and skip on the host.
The grad norm of the check is also what the status line logs, so DeepSpeed's own per-tensor norm
(``zero_optimization.compute_grad_norm``) and per-tensor overflow check (``bf16.check_grad_overflow``) are
switched off where DeepSpeed allows it (ds_config.py); where it does not (ZeRO-3 and DeepSpeed's
BF16_Optimizer compute a norm inside ``step()`` and skip a non-finite one themselves), the check covers
the loss and DeepSpeed's own skip covers the gradients.

DeepSpeed internals are touched in one place, :class:`_DeepSpeedOptimizer` below, and only on the
versions in :data:`TESTED_DEEPSPEED` (checked when the guard is built). What it reads and writes:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): reads ``averaged_gradients`` (this rank's reduced gradient
  partition, the tensors ``step()`` itself consumes); to skip, sets ``check_grad_overflow`` and an
  instance ``check_overflow`` that reports an overflow, for one step: DeepSpeed's own overflow path
  then clears the gradients and counts a skipped step.
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): to skip, an instance ``_overflow_check_and_loss_scale_update``
  that reports an overflow for one step (DeepSpeed's fp16 path).
* ``BF16_Optimizer`` (ZeRO-0/1 in bf16) and a plain torch optimizer (ZeRO-0 in fp32): to skip, an instance
  ``step`` that clears the gradients (BF16_Optimizer's ``clear_hp_grads``/``clear_lp_grads``) and sets
  ``overflow``, which the engine reads after ``step()`` (``engine.was_step_applied()``).
* The device-side skip: the torch optimizer inside ZeRO-1/2's optimizer (``optimizer``) or the engine's own
  (ZeRO-0) gets a ``found_inf`` attribute; after a skipped step the engine's ``skipped_steps`` and
  ``_step_applied`` are set as DeepSpeed's own overflow path sets them, and the LR scheduler, which
  ``engine.step()`` advanced, is stepped back (``lr_scheduler.step(last_batch_iteration - 1)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# DeepSpeed releases whose optimizer internals (above) this module was tested against: [low, high).
TESTED_DEEPSPEED = ((0, 19, 8), (0, 20, 0))


class UnsupportedDeepSpeed(RuntimeError):
    """The installed DeepSpeed is outside :data:`TESTED_DEEPSPEED`."""


def _version_tuple(v: str) -> tuple[int, int, int]:
    parts = []
    for p in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def check_deepspeed_version(version: Optional[str] = None) -> str:
    """The installed DeepSpeed version, or :class:`UnsupportedDeepSpeed` naming the tested range."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    lo, hi = TESTED_DEEPSPEED
    if not lo <= _version_tuple(version) < hi:
        raise UnsupportedDeepSpeed(
            f"deepspeed {version} is not supported: lamamba_dist's non-finite step handling "
            f"(lamamba_dist/train/nonfinite.py) reads DeepSpeed optimizer internals tested on "
            f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}; install that range "
            f"(pip install 'deepspeed>={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}')")
    return version


def optimizer_kind(opt) -> str:
    """"zero12", "zero3", "bf16" (DeepSpeed's BF16_Optimizer) or "torch" (a plain torch optimizer, ZeRO-0 fp32)."""
    name = type(opt).__name__
    return {"DeepSpeedZeroOptimizer": "zero12", "DeepSpeedZeroOptimizer_Stage3": "zero3",
            "BF16_Optimizer": "bf16"}.get(name, "torch")


class _DeepSpeedOptimizer:
    """The one touch-point of DeepSpeed optimizer internals (see the module docstring)."""

    def __init__(self, engine):
        check_deepspeed_version()
        self.engine = engine
        self.opt = engine.optimizer
        self.kind = optimizer_kind(self.opt)

    def local_grads(self) -> Optional[list[torch.Tensor]]:
        """This rank's gradients as the optimizer will use them, or None where DeepSpeed checks them itself."""
        if self.kind == "zero12":
            out: list[torch.Tensor] = []
            for grads in self.opt.averaged_gradients.values():  # padding is skipped, as DeepSpeed's own norm does
                out.extend(g for g in (grads or ()) if g is not None and g.numel()
                           and not getattr(g, "_zero_padding", False))
            return out
        if self.kind == "torch":
            return [p.grad for p in self.engine.module.parameters() if p.grad is not None and p.grad.numel()]
        return None

    @property
    def grads_partitioned(self) -> bool:
        """True when each rank holds a disjoint part of the gradients (ZeRO-1/2), False when each holds all."""
        return self.kind == "zero12"

    def fused_torch_optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The torch fused Adam/AdamW that ``engine.step()`` runs, where a device-side skip applies, else None."""
        inner = self.opt.optimizer if self.kind == "zero12" else self.opt if self.kind == "torch" else None
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and inner.defaults.get("fused"):
            return inner
        return None

    def count_device_skip(self) -> None:
        """After an ``engine.step()`` whose update the fused optimizer skipped on the device: DeepSpeed's
        bookkeeping as its own overflow path leaves it (a skipped step counted, the LR schedule not advanced)."""
        eng = self.engine
        eng._step_applied = False
        eng.skipped_steps += 1
        sched = eng.lr_scheduler
        if sched is not None:
            sched.step(sched.last_batch_iteration - 1)

    def skip_next_step(self) -> None:
        """Make the coming ``engine.step()`` discard the gradients without updating anything."""
        opt = self.opt
        if self.kind == "zero12":
            orig_flag = opt.check_grad_overflow

            def check_overflow(*a, **k):
                opt.overflow = True
                opt.check_grad_overflow = orig_flag
                del opt.check_overflow  # the class's method again

            opt.check_grad_overflow = True
            opt.check_overflow = check_overflow
        elif self.kind == "zero3":
            def forced(update_scale=True):
                del opt._overflow_check_and_loss_scale_update
                opt.overflow = True
                return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True

            opt._overflow_check_and_loss_scale_update = forced
        elif self.kind == "bf16":
            def skipped_step(closure=None):
                del opt.step
                opt.overflow = True
                opt._global_grad_norm = float("inf")
                opt.clear_hp_grads()
                opt.clear_lp_grads()

            opt.step = skipped_step
        else:  # plain torch optimizer: the engine zeroes the module grads after step()
            def skipped_step(*a, **k):
                del opt.step
                opt.overflow = True

            opt.step = skipped_step

    def after_step(self) -> None:
        """Forget a plain optimizer's skip mark (DeepSpeed's own optimizers reset ``overflow`` every step)."""
        if self.kind == "torch" and "overflow" in vars(self.opt):
            del self.opt.overflow

    def deepspeed_grad_norm(self) -> Optional[float]:
        """The norm DeepSpeed computed in the last ``step()`` (ZeRO-3, BF16_Optimizer), else None."""
        if self.kind not in ("zero3", "bf16"):
            return None
        g = self.engine.get_global_grad_norm()
        if g is None:
            return None
        return float(g.item() if torch.is_tensor(g) else g)


@dataclass
class Verdict:
    loss_sum: float  # sum of the micro-batch mean losses over micro-batches and ranks
    grad_norm: Optional[float]  # global L2 norm of the gradients (None where DeepSpeed computes it in step())
    nonfinite: bool  # skip the optimizer step on every rank
    stop: bool  # some rank asked to stop (signal)
    counts: tuple[float, ...] = ()  # the caller's per-rank values summed over ranks (checkpoint writer states)

    def reason(self) -> str:
        """Which part failed, for the log: the loss, the gradients, or both."""
        parts = [] if math.isfinite(self.loss_sum) else ["loss"]
        if self.grad_norm is not None and not math.isfinite(self.grad_norm):
            parts.append("gradients")
        return " and ".join(parts) or "gradients (DeepSpeed's own check)"


class NonFiniteGuard:
    """One per engine. Per step: :meth:`check` before ``engine.step()``, :meth:`finish` after it."""

    def __init__(self, engine, *, world_size: int, device: torch.device, group=None):
        self.ds = _DeepSpeedOptimizer(engine)
        self.world = world_size
        self.device = device
        self.group = group
        # the host's values of the step (stop flag, the caller's counts) on the device, rewritten only when they change
        self._host = torch.zeros(1, dtype=torch.float64, device=device)
        self._host_vals: tuple[float, ...] = (0.0,)
        self.last_grad_norm: Optional[float] = None
        self._flags: Optional[torch.Tensor] = None
        self._verdict: Optional[Verdict] = None
        self._has_grads = False
        self._found_inf: Optional[torch.Tensor] = None
        self.use_device_skip(True)

    def use_device_skip(self, enabled: bool) -> bool:
        """Skip non-finite steps on the device where the optimizer allows it (the default), or always on the host
        (for A/B measurements: scripts/skip_ab.py). Returns whether the skip is now on the device."""
        fused = self.ds.fused_torch_optimizer()
        if fused is not None and enabled:
            # torch's fused Adam skips its update (state included) where found_inf != 0: the device-side skip.
            self._found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
            fused.found_inf = self._found_inf
        else:
            self._found_inf = None
            if fused is not None and "found_inf" in vars(fused):
                del fused.found_inf
        return self._found_inf is not None

    @property
    def kind(self) -> str:
        return self.ds.kind

    @property
    def skips_on_device(self) -> bool:
        return self._found_inf is not None

    @torch.no_grad()
    def check(self, loss_sum: torch.Tensor, stop: bool, counts: tuple[float, ...] = ()) -> None:
        """Collective, before ``engine.step()``. ``loss_sum``: this rank's summed micro-batch losses (a device
        scalar). ``counts``: small host numbers of the caller's, summed over ranks in the same all-reduce (the
        verdict's ``counts``: how the checkpoint writers' states reach every rank without a collective of their
        own). Queues the check; where the skip is on the host, also reads the verdict and arms the skip."""
        grads = self.ds.local_grads()
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
            sumsq = torch.stack(norms).double().square().sum()
        else:
            sumsq = torch.zeros((), dtype=torch.float64, device=self.device)
        vals = (1.0 if stop else 0.0, *(float(c) for c in counts))
        if len(vals) != len(self._host_vals):
            self._host = torch.zeros(len(vals), dtype=torch.float64, device=self.device)
            self._host_vals = (0.0,) * len(vals)
        for i, (v, old) in enumerate(zip(vals, self._host_vals)):
            if v != old:
                self._host[i].fill_(v)  # a kernel argument: no tensor built on the host
        self._host_vals = vals
        flags = torch.cat([torch.stack([loss_sum.detach().to(self.device, torch.float64), sumsq]), self._host])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flags, group=self.group)
        self._flags, self._has_grads, self._verdict = flags, grads is not None, None
        if self._found_inf is not None:
            self._found_inf.copy_(torch.isfinite(flags[:2]).all().logical_not())
        else:
            self._verdict = self._read()
            if self._verdict.nonfinite:
                self.ds.skip_next_step()

    def _read(self) -> Verdict:
        loss, sq, stop_sum, *counts = self._flags.tolist()  # the step's one host sync
        grads = self._has_grads
        if grads and not self.ds.grads_partitioned:
            sq /= self.world  # every rank holds the same full gradients
        grad_norm = math.sqrt(sq) if grads and math.isfinite(sq) and sq >= 0 else (None if not grads else float("nan"))
        nonfinite = not math.isfinite(loss) or (grads and not math.isfinite(sq))
        self.last_grad_norm = grad_norm
        return Verdict(loss_sum=loss, grad_norm=grad_norm, nonfinite=bool(nonfinite), stop=stop_sum > 0,
                       counts=tuple(counts))

    def finish(self) -> Verdict:
        """After ``engine.step()``: the step's verdict (read here where the skip is on the device)."""
        if self._verdict is None:
            self._verdict = self._read()
            if self._verdict.nonfinite:
                self.ds.count_device_skip()
        self.ds.after_step()
        return self._verdict

    def grad_norm(self) -> Optional[float]:
        """The last step's global grad norm: the check's own, or DeepSpeed's where it computes one in ``step()``
        (read from the device only when asked: for the status line)."""
        return self.last_grad_norm if self.last_grad_norm is not None else self.ds.deepspeed_grad_norm()
