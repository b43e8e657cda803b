"""The one place where lamamba_dist touches DeepSpeed internals, on the versions in :data:`TESTED_DEEPSPEED` only.

Two users: the non-finite step handling (nonfinite.py, through :class:`DeepSpeedOptimizer`) and the fused
gradient reduction of ZeRO-1/2 (:class:`FusedGradients`). Both check the version when they are built
(:func:`check_deepspeed_version`). What they read and write:

:class:`DeepSpeedOptimizer`:

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

:class:`FusedGradients` (ZeRO-1/2, ``DeepSpeedZeroOptimizer`` without offload):

* reads the layout of the flat low-precision weights (``bit16_groups``, ``bit16_groups_flat``,
  ``partition_size``, ``dp_process_group``);
* removes the optimizer's per-parameter gradient hooks (``_grad_acc_hooks``) once, at setup;
* per optimizer step, writes this rank's reduced gradient partition into ``averaged_gradients[i]`` as a list
  with a ``flat_partition`` attribute: the form DeepSpeed's ``step()`` takes from a pass that has flattened the
  partition itself (``_get_preflattened_grad_partition``, the entry DeepSpeed's DeepCompile uses);
* sets an instance ``_update_model_bit16_weights`` that re-points the weights at their views of the flat buffer
  only when the flat buffer has moved since it last did (offload and reload move it). ``step()`` calls it at its
  end for every group ("we probably don't need this? just to be safe", DeepSpeed's comment), a Python loop over
  every parameter tensor, twice, that re-creates the views the weights already are.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

# DeepSpeed releases whose internals (above) this module was tested against: [low, high).
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
            f"deepspeed {version} is not supported: lamamba_dist's gradient reduction and non-finite step "
            f"handling (lamamba_dist/train/ds_internals.py) use DeepSpeed optimizer internals tested on "
            f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}; install that range "
            f"(pip install 'deepspeed>={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}')")
    return version


def optimizer_kind(opt) -> str:
    """"zero12", "zero3", "bf16" (DeepSpeed's BF16_Optimizer) or "torch" (a plain torch optimizer, ZeRO-0 fp32)."""
    name = type(opt).__name__
    return {"DeepSpeedZeroOptimizer": "zero12", "DeepSpeedZeroOptimizer_Stage3": "zero3",
            "BF16_Optimizer": "bf16"}.get(name, "torch")


class DeepSpeedOptimizer:
    """What nonfinite.py reads and sets in the engine's optimizer (see the module docstring)."""

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


class _Preflattened(list):
    """``averaged_gradients[i]`` as :class:`FusedGradients` hands it to DeepSpeed: ``[partition]``, and the same
    tensor as ``flat_partition`` (which ``step()`` consumes without flattening again)."""

    def __init__(self, partition: torch.Tensor):
        super().__init__([partition])
        self.flat_partition = partition


def fused_gradients_unsupported(engine) -> Optional[str]:
    """Why :class:`FusedGradients` cannot drive this engine (DeepSpeed's own path is used then), or None."""
    opt = engine.optimizer
    kind = optimizer_kind(opt)
    if kind != "zero12":
        return {"zero3": "ZeRO-3 gathers and partitions in its own hooks",
                "bf16": "ZeRO-1 in bf16 runs DeepSpeed's BF16_Optimizer",
                "torch": "ZeRO-0 reduces in the engine"}[kind]
    if getattr(opt, "cpu_offload", False):
        return "the optimizer is offloaded to the CPU"
    if engine.gradient_clipping() > 0:
        return "gradient clipping needs DeepSpeed's own norm"
    if getattr(engine, "torch_autocast_enabled", lambda: False)():
        return "DeepSpeed's torch_autocast section wraps the engine's forward"
    if engine.gradient_predivide_factor() != 1.0 or not getattr(opt, "gradient_average", True):
        return "a gradient predivide factor or summed (not averaged) gradients"
    if getattr(opt, "use_grad_accum_attribute", False):
        return "DeepSpeed accumulates in a separate attribute here"
    if any(len(opt.bit16_groups[i]) == 0 for i in range(len(opt.bit16_groups))):
        return "an empty parameter group"
    if set(map(id, opt.real_dp_process_group)) != {id(opt.dp_process_group)}:
        return "parameter groups reduce over different process groups (MoE)"
    return None


class FusedGradients:
    """ZeRO-1/2 gradients in one pass per step, without DeepSpeed's per-parameter hooks.

    DeepSpeed's ZeRO-1/2 runs a Python hook for every parameter tensor as backward produces its gradient
    (bookkeeping, bucket accounting), and copies the reduced bucket back into every gradient one tensor at a
    time: per step as many Python calls and device copies as the model has parameter tensors (657 for
    LaMamba-XL), which bounds the step wherever the device is faster than the host. Here instead:

    * :meth:`forward` calls the module itself (not the engine's forward, which installs the hooks that drive
      DeepSpeed's backward bookkeeping);
    * :meth:`backward` takes the gradients of all weights from one ``torch.autograd.grad`` call (no
      ``.grad`` attributes, no hooks), scales them by 1/accumulation steps as ``engine.backward`` does, and
      concatenates them into one flat buffer per parameter group, laid out exactly like DeepSpeed's flat
      low-precision weights (``bit16_groups_flat``); micro-batches accumulate into it (in the weights'
      dtype, as DeepSpeed's ZeRO-2 accumulates);
    * one reduce-scatter per group (the average over ranks, as DeepSpeed's ``average_tensor``: divided by the
      world size, then summed) leaves this rank's partition: after every micro-batch under ZeRO-2 (which then
      keeps only its partition between micro-batches), after the last one under ZeRO-1, as DeepSpeed does; at
      the step's last micro-batch the partition goes to ``averaged_gradients`` for ``engine.step()``.

    The optimizer step, the master weights, checkpoints and the EMA are DeepSpeed's as before; the gradients
    are bitwise those of DeepSpeed's own path (tests/train/test_fused_gradients.py, 2 ranks, ZeRO-1/2, fp32 and
    bf16, with accumulation). Memory: ZeRO-2 on several ranks releases each bucket of gradients as it is
    reduced during the backward; here a micro-batch's gradients and their flat copy exist together at the end
    of its backward. ``[train] grad_reduction = "deepspeed"`` keeps DeepSpeed's path for a model whose
    gradients would not fit that way.
    """

    def __init__(self, engine, accum: int):
        check_deepspeed_version()
        why = fused_gradients_unsupported(engine)
        if why:
            raise ValueError(f"fused gradient reduction does not apply: {why}")
        self.engine, self.opt, self.accum = engine, engine.optimizer, int(accum)
        opt = self.opt
        self.group = opt.dp_process_group
        import torch.distributed as dist

        self.world = dist.get_world_size(group=self.group)
        self.groups: list[tuple[int, int]] = []  # per group: (first index into self.params, padding elements)
        params: list[torch.Tensor] = []
        for i, group in enumerate(opt.bit16_groups):
            flat = opt.bit16_groups_flat[i]
            off, esize = 0, flat.element_size()
            for p in group:  # the flat layout is the parameters in order, then padding
                if p.dtype != flat.dtype or p.data_ptr() != flat.data_ptr() + off * esize:
                    raise ValueError(f"fused gradient reduction does not apply: parameter group {i} is not laid "
                                     "out in DeepSpeed's flat buffer in order")
                off += p.numel()
            if opt.partition_size[i] * self.world != flat.numel():
                raise ValueError(f"fused gradient reduction does not apply: group {i} has {flat.numel()} elements, "
                                 f"not {self.world} partitions of {opt.partition_size[i]}")
            self.groups.append((len(params), flat.numel() - off))
            params.extend(group)
        self.params = tuple(params)
        self._bounds = [s for s, _ in self.groups] + [len(params)]
        for handle in opt._grad_acc_hooks:
            handle.remove()
        opt._grad_acc_hooks.clear()
        self._skip_redundant_rebinding(opt)
        self._acc: Optional[list[torch.Tensor]] = None
        # ZeRO-2 reduces every micro-batch and accumulates its partition, ZeRO-1 accumulates the full gradients
        # and reduces at the step: DeepSpeed's orders of summation, so that the results are bitwise its own
        self.per_micro_batch = bool(opt.partition_gradients)
        # torch >= 2.12 names the single-tensor reduce-scatter reduce_scatter_single
        self._reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    @staticmethod
    def _skip_redundant_rebinding(opt) -> None:
        """See the module docstring: DeepSpeed's rebinding of the weights to the flat buffer, run only when the
        buffer (its storage, size or device) is not the one the weights were last bound to."""
        rebind = type(opt)._update_model_bit16_weights.__get__(opt)
        flat_key = lambda i: (opt.bit16_groups_flat[i].data_ptr(), opt.bit16_groups_flat[i].numel(),  # noqa: E731
                              opt.bit16_groups_flat[i].device)
        bound = {i: flat_key(i) for i in range(len(opt.bit16_groups))}  # checked laid out so in __init__

        def update_model_bit16_weights(group_index: int) -> None:
            key = flat_key(group_index)
            if bound.get(group_index) != key:
                rebind(group_index)
                bound[group_index] = key

        opt._update_model_bit16_weights = update_model_bit16_weights

    def forward(self, *args, **kwargs):
        return self.engine.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor, boundary: bool) -> None:
        """The gradients of one micro-batch's ``loss``; ``boundary``: the step's last micro-batch."""
        if self.accum > 1:
            loss = loss / self.accum
        grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
        flats = []
        for (first, pad), end in zip(self.groups, self._bounds[1:]):
            flat = torch._utils._flatten_dense_tensors(grads[first:end])
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad)])
            flats.append(flat)
        del grads
        if self.per_micro_batch:  # ZeRO-2: reduce now, keep only this rank's partition until the step
            flats = [self._partition(i, flat) for i, flat in enumerate(flats)]
        if self._acc is None:
            self._acc = flats
        else:
            torch._foreach_add_(self._acc, flats)
        if boundary:
            acc, self._acc = self._acc, None
            for i, flat in enumerate(acc):
                self.opt.averaged_gradients[i] = _Preflattened(flat if self.per_micro_batch
                                                               else self._partition(i, flat))

    def _partition(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """This rank's partition of the average of ``flat`` over the ranks (DeepSpeed's ``average_tensor``:
        divided by the world size, then summed)."""
        if self.world == 1:
            return flat
        flat.div_(self.world)
        part = flat.new_empty(self.opt.partition_size[i])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old name on newer torch
            self._reduce_scatter(part, flat, group=self.group)
        return part
