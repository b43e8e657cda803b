"""Regional compilation: ``torch.compile`` applied per block rather than to the whole network.

Blocks of the same configuration share one compiled graph, so compile time grows with the number of
distinct block shapes (about ten for LaMamba-Diff), not with depth, and is paid again quickly after a
preemption. Shapes are specialised (``dynamic=False``): training shapes never change within a run.
The fused selective scan is a registered custom op, so the graphs carry no break at the scan.
"""

from __future__ import annotations

import torch.nn as nn


# torch.compile's modes (``[train] compile_mode``, ``lamamba bench --compile-mode``). "reduce-overhead" (and
# "max-autotune") replay each compiled block as a CUDA graph: one launch per block instead of one per kernel, for a
# step bound by the host's launches; the training loop then marks the start of every micro-batch
# (:func:`step_begin`), so that a replay never overwrites an output the previous micro-batch still uses.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def uses_cudagraphs(mode: str | None) -> bool:
    """Whether blocks compiled with ``mode`` run as CUDA graphs (on CUDA devices)."""
    return mode in ("reduce-overhead", "max-autotune")


def step_begin() -> None:
    """Tell torch.compile's CUDA graph trees that a new micro-batch starts (a no-op without CUDA graphs)."""
    import torch

    torch.compiler.cudagraph_mark_step_begin()


def block_types() -> tuple[type, ...]:
    from lamamba_dist.models.dit import DiTBlock
    from lamamba_dist.models.lamamba import LaMambaBlock

    return (LaMambaBlock, DiTBlock)


def glue_types() -> tuple[type, ...]:
    """The modules between LaMamba-Diff's stages (patch merging and expanding: a gather of the 2x2 neighbours or a
    pixel shuffle, a LayerNorm and a Linear), compiled beside the blocks with ``glue=True``: eagerly their
    concatenation, permuted copies and LayerNorms are separate kernels each way, and the concatenation's backward
    writes four zero-filled copies of the map. DiT has none."""
    from lamamba_dist.models.lamamba import PatchExpanding, PatchMerging

    return (PatchMerging, PatchExpanding)


def set_activation_memory_budget(budget: float) -> None:
    """AOT autograd's activation memory budget for every graph compiled afterwards in this process: 1.0 (torch's
    default) saves what the min-cut partitioner finds fastest; lower values make it recompute more in the backward
    (cheap ops first, then matmuls) to save less, down to 0.0 (recompute everything it can). For LaMamba's SS2D
    this drops, e.g., the four snake-ordered copies of the map and the dt-projected deltas (B, 4, D, L) that the
    scan would otherwise keep for the backward. Eager mode is unaffected."""
    import torch._functorch.config as functorch_config

    if not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"activation memory budget must be in [0, 1], got {budget}")
    functorch_config.activation_memory_budget = float(budget)


def compile_blocks(model: nn.Module, mode: str | None = None, fullgraph: bool = True, backend: str = "inductor",
                   memory_budget: float | None = None, glue: bool = True) -> nn.Module:
    """Compile every transformer/LaMamba block of ``model`` in place; returns the model. ``mode``: one of
    :data:`COMPILE_MODES` ("default" or None: torch's default). ``memory_budget``: see set_activation_memory_budget
    (None leaves the process's setting alone). ``glue``: also the modules between the stages (:func:`glue_types`;
    False compiles the blocks alone)."""
    import torch._dynamo

    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    mode = None if mode == "default" else mode

    if memory_budget is not None:
        set_activation_memory_budget(memory_budget)

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    n = 0
    glue_modules = glue_types() if glue else ()
    for m in model.modules():
        if isinstance(m, block_types()):
            m.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=False)
            n += 1
        elif isinstance(m, glue_modules):
            m.compile(backend=backend, mode=mode, fullgraph=fullgraph, dynamic=False)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no blocks to compile")
    return model


def use_compile_cache(path) -> str:
    """Keep torch.compile's caches (inductor FX graphs, AOT autograd, Triton kernels) in ``path`` unless
    TORCHINDUCTOR_CACHE_DIR is already set: a run directory on shared storage makes every restart after a
    preemption, on any node, load the compiled blocks instead of compiling them again. Returns the dir used."""
    import os
    from pathlib import Path

    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        Path(path).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(path).resolve())
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
