"""Non-finite steps: one fused check per step on the device, and skipping the optimizer step on every rank.

The check (:meth:`NonFiniteGuard.check`) runs once per optimizer step, after the last micro-batch's
backward and before ``engine.step()``; :meth:`NonFiniteGuard.finish` after it returns the verdict:

* the loss summed over the step's micro-batches stays on the device (no sync per micro-batch);
* the squared L2 norm of this rank's reduced gradients is one ``torch._foreach_norm`` over them;
* (loss sum, grad sum of squares, stop flag) are stacked into one device tensor, all-reduced once
  (the step's only collective of our own), copied to pinned host memory without waiting, and read once:
  the step's one wait for the device, which covers the work up to the check and nothing queued after it.

A step is *non-finite* when the global loss sum or the global grad norm is not finite; every rank then
sees the same verdict and skips the optimizer step (weights, EMA, Adam state and LR schedule unchanged).

Where the optimizer is torch's fused Adam/AdamW under ZeRO-0/1/2 (the default on GPUs and CPUs), the skip
happens on the device: the verdict is written into the optimizer's ``found_inf`` tensor (torch's own
mechanism for skipping a fused step, the one ``GradScaler`` uses), ``engine.step()`` is queued without
waiting, and the verdict is read in :meth:`finish`, after the whole step has been queued (the trainer may
call it as late as after the next step's backward: trainer.py ``queue_step``). A host read before
``engine.step()`` would drain the device queue there and leave the device idle while the host runs the
optimizer's Python; read after it, it costs at most the wait for the work up to the check. After a device-side
skip, :meth:`finish` restores DeepSpeed's bookkeeping of a skipped step
(its skipped-step count, the LR schedule, ``engine.was_step_applied()``). Other optimizers (ZeRO-3,
DeepSpeed's BF16_Optimizer, CPU-offloaded Adam) read the verdict in :meth:`check` and skip on the host.
The grad norm of the check is also what the status line logs, so DeepSpeed's own per-tensor norm
(``zero_optimization.compute_grad_norm``) and per-tensor overflow check (``bf16.check_grad_overflow``) are
switched off where DeepSpeed allows it (ds_config.py); where it does not (ZeRO-3 and DeepSpeed's
BF16_Optimizer compute a norm inside ``step()`` and skip a non-finite one themselves), the check covers
the loss and DeepSpeed's own skip covers the gradients.

DeepSpeed internals (what the check reads, how a skip is made) are touched only in ds_internals.py
(:class:`~lamamba_dist.train.ds_internals.DeepSpeedOptimizer`), on the DeepSpeed versions tested there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from lamamba_dist.train.ds_internals import DeepSpeedOptimizer


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
        self.ds = DeepSpeedOptimizer(engine)
        self.world = world_size
        self.device = device
        self.group = group
        # the host's values of the step (stop flag, the caller's counts) on the device, rewritten only when they change
        self._host = torch.zeros(1, dtype=torch.float64, device=device)
        self._host_vals: tuple[float, ...] = (0.0,)
        self.last_grad_norm: Optional[float] = None
        self._flags: Optional[torch.Tensor] = None
        self._flags_host: Optional[torch.Tensor] = None  # pinned copy of the flags (CUDA)
        self._flags_ready = None  # CUDA event: the copy is done
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
        self._has_grads, self._verdict = grads is not None, None
        if self.device.type == "cuda":
            # copied to pinned host memory as soon as the device gets here; _read() waits for this copy only, not
            # for the optimizer step queued after it (nor, when the step is settled late, for the next step)
            if self._flags_host is None or self._flags_host.shape != flags.shape:
                self._flags_host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
                self._flags_ready = torch.cuda.Event()
            self._flags_host.copy_(flags, non_blocking=True)
            self._flags_ready.record()
            self._flags = self._flags_host
        else:
            self._flags = flags
        if self._found_inf is not None:
            self._found_inf.copy_(torch.isfinite(flags[:2]).all().logical_not())
        else:
            self._verdict = self._read()
            if self._verdict.nonfinite:
                self.ds.skip_next_step()

    def _read(self) -> Verdict:
        if self._flags is self._flags_host:
            self._flags_ready.synchronize()  # the step's one wait for the device
        loss, sq, stop_sum, *counts = self._flags.tolist()
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
