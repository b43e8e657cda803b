"""A micro-batch of the latent loader (lamamba_dist/data/loader.py) as one buffer.

A DataLoader worker hands a tensor over as a shared-memory block with a file descriptor passed through a socket,
the pin-memory thread pins each tensor, and the trainer copies each to the device: per tensor a round of host
work, partly on the thread that also launches the step's kernels. A batch packed into one buffer (:func:`pack`)
makes that one round; its tensors are views of the buffer (:func:`unpack`, :class:`Batch`).
"""

from __future__ import annotations

import torch

_ALIGN = 64  # bytes between the starts of a packed batch's tensors: any dtype's view of the buffer is aligned


def pack(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[tuple]]:
    """The tensors of a batch in one uint8 buffer, and its layout ``[(name, dtype, shape, offset, bytes)]``."""
    layout, off = [], 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        layout.append((name, t.dtype, tuple(t.shape), off, n))
        off += -(-n // _ALIGN) * _ALIGN
    buf = torch.empty(off, dtype=torch.uint8)
    for (_, dtype, _, o, n), t in zip(layout, tensors.values()):
        buf[o:o + n].view(dtype).copy_(t.reshape(-1))
    return buf, layout


def unpack(buf: torch.Tensor, layout: list[tuple]) -> dict[str, torch.Tensor]:
    """The tensors of :func:`pack`'s buffer (on whichever device ``buf`` is), as views of it."""
    return {name: buf[o:o + n].view(dtype).view(shape) for name, dtype, shape, o, n in layout}


class Batch(dict):
    """One micro-batch of :class:`LatentLoader`: ``{"latent", "label", "key"}`` and, with diffusion draws,
    ``"t"``, ``"noise"``, ``"u"``. Its tensors are views of one host buffer (``packed``, pinned when the loader
    pins), which :meth:`to` copies to a device in one transfer."""

    packed: torch.Tensor
    layout: list

    @classmethod
    def from_packed(cls, packed: torch.Tensor, layout: list, **rest) -> "Batch":
        b = cls(unpack(packed, layout), **rest)
        b.packed, b.layout = packed, layout
        return b

    def to(self, device, non_blocking: bool = False) -> dict:
        """The batch on ``device``: its tensors as views of one copy of the buffer; other entries as they are."""
        out = {k: v for k, v in self.items() if not torch.is_tensor(v)}
        out.update(unpack(self.packed.to(device, non_blocking=non_blocking), self.layout))
        return out
