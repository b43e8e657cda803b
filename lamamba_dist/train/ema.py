"""EMA of the fp32 (master) weights that is exact under every ZeRO stage, without gathering each step.

EMA is elementwise, so each rank keeps the EMA of exactly the slice of each parameter whose fp32 master
copy it owns, and updates it locally after every optimizer step (no communication):

* ZeRO-1/2 and stage 0 in bf16: DeepSpeed links each module parameter to its fp32 fragment on this rank
  (``param._hp_mapping``: ``hp_fragment`` and its offset ``lp_fragment_address.start`` in the flat parameter);
* ZeRO-3: the local fp32 partition (``safe_get_local_fp32_param``), offset ``partition_rank * partition_numel``;
* stage 0 in fp32 (no partitioning): the module parameter itself, kept on rank 0 only.

The update is DiT's ``ema.mul_(decay).add_(w, alpha=1 - decay)`` in fp32, so the result equals a plain
PyTorch EMA of the full fp32 weights bit for bit (on CUDA as one pass over each flat buffer,
lamamba_dist/ops/ema_update.py, rounded as the two ops). :meth:`full_state_dict` assembles full tensors (a
reduction of disjoint slices, exact) for saving, so the saved EMA is independent of the world size;
:meth:`load_full_state_dict` slices a full EMA back onto whatever partitioning the new run has.
Parameters with ``requires_grad=False`` are not averaged (they never change).

On CUDA the update may run on a stream of its own (``overlap``): it waits, on the device, for the optimizer
step it averages (an event the caller records after ``engine.step()``), and the next ``engine.step()`` waits, on
the device, for it (:meth:`join`, which the trainer calls before every ``engine.step()``). In between, the
update's one pass over the master weights (memory-bound, about 1.9 ms for 675M parameters on an H200) runs
beside the next step's forward and backward instead of after them. The host never waits. Every method that
reads or replaces the shadows or the master weights' storage joins first, so the results are the same bits.
"""

from __future__ import annotations

from typing import Optional

import torch

from lamamba_dist.ops.ema_update import ema_update_


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def local_fp32_fragment(param: torch.nn.Parameter, rank: int, owner_full: bool) -> Optional[tuple[int, torch.Tensor]]:
    """``(start, flat fp32 view)`` of this rank's slice of ``param``'s master weights, or None if it owns none."""
    if hasattr(param, "ds_id"):  # ZeRO-3 partitioned parameter
        from deepspeed.utils import safe_get_local_fp32_param

        part_numel = param.partition_numel()
        prank = param._z3_optimizer._get_param_partition_rank(param)
        start = prank * part_numel
        real = min(part_numel, max(0, param.ds_numel - start))
        if real == 0:
            return None
        local = safe_get_local_fp32_param(param)
        return start, local.reshape(-1)[:real]
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment().reshape(-1)
    if hasattr(param, "_hp_mapping"):  # linked, but this rank holds no fragment of it
        return None
    # Not partitioned (stage 0, fp32): every rank has the full parameter; one owner keeps the EMA.
    if not owner_full:
        return None
    return 0, param.detach().reshape(-1)


class ZeroEMA:
    """EMA of a (possibly DeepSpeed-wrapped) model's trainable parameters, sliced like the fp32 master weights.

    The local slices are resolved once (:meth:`relink`, again after every checkpoint load, which may give the
    master weights new storage). Slices that are views of one flat master buffer (ZeRO-1/2 fragments, ZeRO-3
    partitions) get their shadows laid out the same way in one flat fp32 buffer, so :meth:`update` is one
    kernel per flat buffer on CUDA (``ops.ema_update.ema_update_``; ``mul_`` and ``add_`` elsewhere) instead of
    two per parameter; the remaining slices are
    updated with ``torch._foreach_mul_`` / ``_foreach_add_``. Both compute exactly ``s * d + w * (1 - d)``
    per element, as the per-parameter loop did.
    """

    def __init__(self, module: torch.nn.Module, decay: float, rank: int = 0, overlap: bool = False):
        self.module = module
        self.decay = float(decay)
        self.rank = rank
        self.names: list[str] = []
        self.params: dict[str, torch.nn.Parameter] = {}
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.params[name] = p
        self.shadow: dict[str, tuple[int, torch.Tensor]] = {}
        self._flat: list[tuple[torch.Tensor, torch.Tensor]] = []  # (shadow buffer, master span) pairs
        self._loose: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])  # (shadows, master slices)
        self._stream: Optional[torch.cuda.Stream] = None  # the update's own stream (overlap on CUDA)
        self._done: Optional[torch.cuda.Event] = None  # the last update queued on it, not yet joined
        self._overlap = bool(overlap)
        self.relink()
        self.reset_from_weights()

    # ------------------------------------------------------------------ local slices
    def _fragment(self, name: str):
        return local_fp32_fragment(self.params[name], self.rank, owner_full=(self.rank == 0))

    @staticmethod
    def full_shape(p: torch.nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape

    def relink(self) -> None:
        """Resolve this rank's master-weight slices and lay out fresh (zeroed) shadows to match them."""
        self.join()  # the old shadows may still be read by a queued update
        self._frags: dict[str, tuple[int, torch.Tensor]] = {}
        for name in self.names:
            frag = self._fragment(name)
            if frag is not None:
                self._frags[name] = frag
        by_storage: dict[tuple, list[str]] = {}
        for name, (_, w) in self._frags.items():
            key = (w.device, w.dtype, w.untyped_storage().data_ptr())
            by_storage.setdefault(key, []).append(name)
        self.shadow.clear()
        self._flat, loose_s, loose_w = [], [], []
        for (device, dtype, _), names in by_storage.items():
            ws = [self._frags[n][1] for n in names]
            if len(names) < 2 or dtype != torch.float32 or not all(w.is_contiguous() for w in ws):
                for n in names:
                    start, w = self._frags[n]
                    s = torch.zeros(w.numel(), dtype=torch.float32, device=w.device)
                    self.shadow[n] = (start, s)
                    loose_s.append(s)
                    loose_w.append(w)
                continue
            offs = [w.storage_offset() for w in ws]
            lo = min(offs)
            hi = max(o + w.numel() for o, w in zip(offs, ws))
            span = torch.empty(0, dtype=dtype, device=device).set_(ws[0].untyped_storage(), lo, (hi - lo,))
            buf = torch.zeros(hi - lo, dtype=torch.float32, device=device)
            for n, o, w in zip(names, offs, ws):
                self.shadow[n] = (self._frags[n][0], buf[o - lo: o - lo + w.numel()])
            self._flat.append((buf, span))
        self._loose = (loose_s, loose_w)
        devices = {b.device for b, _ in self._flat} | {x.device for x in loose_s}
        self._stream = None
        if self._overlap and len(devices) == 1 and next(iter(devices)).type == "cuda":
            self._stream = torch.cuda.Stream(device=next(iter(devices)))

    @property
    def overlapped(self) -> bool:
        """Whether :meth:`update` runs on a stream of its own (``overlap`` on CUDA)."""
        return self._stream is not None

    def join(self) -> None:
        """Make the current stream wait, on the device, for the last queued update (no host wait)."""
        if self._done is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._done)
            self._done = None

    @torch.no_grad()
    def reset_from_weights(self) -> None:
        """EMA := current weights (DiT initialises the EMA as a copy of the model)."""
        self.join()
        for name, (_, s) in self.shadow.items():
            s.copy_(self._frags[name][1])

    @torch.no_grad()
    def update(self, decay: Optional[float] = None, after: Optional[torch.cuda.Event] = None) -> None:
        """One EMA step from the current master weights. With ``overlap`` on CUDA it is queued on the update's own
        stream behind ``after`` (an event recorded after the optimizer step it averages; None: everything queued
        so far on the current stream), and the caller joins (:meth:`join`) before the master weights change."""
        d = self.decay if decay is None else float(decay)
        if self._stream is None:
            self._apply(d)
            return
        if after is None:
            after = torch.cuda.Event()
            after.record(torch.cuda.current_stream(self._stream.device))
        self._stream.wait_event(after)
        with torch.cuda.stream(self._stream):
            self._apply(d)
            self._done = torch.cuda.Event()
            self._done.record(self._stream)

    def _apply(self, d: float) -> None:
        for buf, span in self._flat:
            ema_update_(buf, span, d)
        shadows, weights = self._loose
        if shadows:
            torch._foreach_mul_(shadows, d)
            torch._foreach_add_(shadows, [w.float() if w.dtype != torch.float32 else w for w in weights],
                                alpha=1.0 - d)

    # ------------------------------------------------------------------ full tensors (collective)
    @torch.no_grad()
    def _assemble(self, get_local, dst: Optional[int], to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """Full fp32 tensors from disjoint per-rank slices (sum of zero-filled buffers: exact). ``to_cpu=False``
        leaves them on the device (views of the reduced buckets), for a caller that copies them asynchronously."""
        dist = _dist()
        out: dict[str, torch.Tensor] = {}
        # Bucket parameters into ~64M-element flat buffers to keep the number of collectives small.
        bucket: list[str] = []
        size = 0
        limit = 64 << 20

        def flush():
            nonlocal bucket, size
            if not bucket:
                return
            numels = [int(torch.Size(self.full_shape(self.params[n])).numel()) for n in bucket]
            device = next(iter(v[1] for v in self.shadow.values()), torch.zeros(0)).device
            flat = torch.zeros(sum(numels), dtype=torch.float32, device=device)
            off = 0
            for n, k in zip(bucket, numels):
                loc = get_local(n)
                if loc is not None:
                    start, t = loc
                    flat[off + start: off + start + t.numel()].copy_(t.to(flat.device, torch.float32))
                off += k
            if dist is not None and dist.get_world_size() > 1:
                if dst is None:
                    dist.all_reduce(flat)
                else:
                    dist.reduce(flat, dst=dst)
            off = 0
            for n, k in zip(bucket, numels):
                v = flat[off: off + k].view(self.full_shape(self.params[n]))
                out[n] = v.cpu().clone() if to_cpu else v
                off += k
            bucket, size = [], 0

        for name in self.names:
            k = int(torch.Size(self.full_shape(self.params[name])).numel())
            if size and size + k > limit:
                flush()
            bucket.append(name)
            size += k
        flush()
        return out

    def full_state_dict(self, dst: Optional[int] = 0, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors (valid on ``dst``, or on every rank when ``dst`` is None). Collective."""
        return self._assemble(lambda n: self.shadow.get(n), dst, to_cpu)

    def full_master_weights(self, dst: Optional[int] = 0, to_cpu: bool = True) -> dict[str, torch.Tensor]:
        """Full fp32 master weights of the trainable parameters, assembled the same way. Collective."""
        return self._assemble(self._fragment, dst, to_cpu)

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor], source: str = "EMA") -> None:
        missing = [n for n in self.names if n not in full]
        if missing:
            raise KeyError(f"{source}: missing EMA tensor(s) {', '.join(missing[:5])}")
        for name in self.names:
            src = full[name]
            if tuple(src.shape) != tuple(self.full_shape(self.params[name])):
                raise ValueError(f"{source}: {name} has shape {tuple(src.shape)}, the model {tuple(self.full_shape(self.params[name]))}")
        self.relink()  # a checkpoint load may have given the master weights new storage
        for name, (start, s) in self.shadow.items():
            s.copy_(full[name].reshape(-1)[start: start + s.numel()])
