"""Build the DeepSpeed config dict from the TOML sections (``[train]`` and ``[optim]``).

Paper recipe (DiT / LaMamba-Diff): AdamW, lr 1e-4 constant, weight decay 0.01 on *all* parameters
(the official code passes ``model.parameters()`` to ``torch.optim.AdamW`` without groups), betas
(0.9, 0.999), no gradient clipping, global batch 256.

Optimizer implementation: torch's AdamW through DeepSpeed (``"torch_adam": true``, no JIT build), with
``fused=True`` (GPUs and CPUs: its ``found_inf`` lets nonfinite.py skip a step on the device); with optimizer
offload DeepSpeed's CPUAdam (JIT-built once, ~70 s).

Precision (``[train] precision``; README "Precision" says why bf16 is the default):

* ``"bf16"``: DeepSpeed's bf16 mode. The engine holds bf16 weights and gradients, the optimizer fp32 master
  weights (its flat partition) and fp32 Adam state. The trainer casts the model input to bf16 at the model
  boundary and the output back to fp32; the diffusion math (q_sample, MSE, VLB) stays fp32.
* ``"bf16_autocast"``: fp32 weights and gradients, bf16 compute through DeepSpeed's ``torch_autocast``
  section (the engine enters ``torch.autocast`` itself; the trainer adds none).
  ``"bf16"`` at ZeRO stage 0 runs this way too: DeepSpeed 0.19 has no stage-0 bf16 optimizer with fp32 master
  weights (it would step a plain optimizer on the bf16 weights, where small updates round away).
* ``"fp32"``: everything fp32 (TF32 matmuls on GPUs).

DeepSpeed's per-tensor checks are off (``bf16.check_grad_overflow``, and ``zero_optimization.compute_grad_norm``
where no clipping needs it): the trainer's one fused check per step (nonfinite.py) replaces them.
"""

from __future__ import annotations

from typing import Any


def gradient_accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    per_step = micro_batch * world_size
    if global_batch % per_step != 0:
        raise ValueError(
            f"[train] global_batch = {global_batch} is not a multiple of micro_batch ({micro_batch}) x "
            f"world size ({world_size}) = {per_step}; choose a micro_batch that divides global_batch / world_size"
        )
    return global_batch // per_step


def aligned_param_order(params, align_bytes: int = 16) -> list:
    """The parameters in the order that keeps every weight whose size allows it on an ``align_bytes`` boundary
    in DeepSpeed's flat buffers.

    ZeRO-1/2 flatten the parameters into one buffer, one after another, and make the module's parameters views
    into it. One parameter whose size is not a multiple of ``align_bytes`` (LaMamba-S/B/L's relative-position
    tables, (2w-1)^2 x heads elements) would shift every later one off the boundary, and compiled blocks fail
    on such weights on the GPU ("CUDA error: misaligned address" in their matmuls). So the odd-sized ones go
    last (in their original order); they are only read by index (the attention bias gather), which needs no
    alignment. Sizes are counted in bf16 (2 bytes), the narrowest dtype the engine holds, so fp32 buffers are
    aligned too. Models whose sizes are all multiples (LaMamba-XL, DiT) keep their order. One parameter group,
    as the paper's optimizer has: DeepSpeed's universal checkpoints (elastic resume) need every group to have
    a part on every rank, which a group of one small tensor does not.
    """
    per = max(1, align_bytes // 2)
    params = list(params)
    return [p for p in params if p.numel() % per == 0] + [p for p in params if p.numel() % per != 0]


def bf16_weights(precision: str, zero_stage: int) -> bool:
    """Whether the engine holds bf16 weights (DeepSpeed's bf16 mode) for this precision and ZeRO stage."""
    return precision == "bf16" and zero_stage > 0


def build_ds_config(train, optim, world_size: int, *, on_cuda: bool, load_universal: bool = False,
                    num_params: int = 0) -> dict[str, Any]:
    """DeepSpeed config for ``deepspeed.initialize`` from a ``TrainConfig`` and an ``OptimConfig``.

    ``num_params`` bounds the ZeRO communication buckets on CPU: DeepSpeed's default (5e8 elements)
    is allocated afresh per micro-step there, which costs seconds per step for a tiny model.
    """
    accum = gradient_accumulation_steps(train.global_batch, train.micro_batch, world_size)
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if not optim.offload_optimizer:
        # torch.optim.AdamW through DeepSpeed ("torch_adam"): no JIT build (FusedAdam takes ~50-85 s per fresh
        # machine and trips over TORCH_CUDA_ARCH_LIST=9.0a on the GPU image). Its fused kernel (``fused=True``,
        # CUDA and CPU): the optimizer of the baselines in docs/performance.md, and one that skips a
        # non-finite step on the device (nonfinite.py).
        params["torch_adam"] = True
        params["fused"] = True
    cfg: dict[str, Any] = {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": accum,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": bf16_weights(train.precision, train.zero_stage)},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": train.precision.startswith("bf16") and not bf16_weights(train.precision,
                                                                                               train.zero_stage),
                           "dtype": "bfloat16"},
        "steps_per_print": 10**12,  # our own status line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on and synchronized by default: a full device synchronize at every
        # forward and every step() (the GPU queue drains twice a step). The status line measures img/s itself.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
    if bf16_weights(train.precision, train.zero_stage) and train.zero_stage == 1:
        # Without this DeepSpeed (0.19) accumulates stage-1 gradients in bf16; fp32 gradient accumulation
        # selects its BF16_Optimizer (fp32 master weights and fp32 gradients).
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if bf16_weights(train.precision, train.zero_stage):
        # Default true: an amax/amin/isfinite per gradient tensor and a host sync, every step (nonfinite.py
        # checks the global norm instead, once).
        cfg["bf16"]["check_grad_overflow"] = False
    # DeepSpeed's own grad norm in ZeRO-1/2 (a norm per tensor, in fp64, and a host sync) is needed only to
    # clip; the trainer's check computes the norm it logs. DeepSpeed allows turning it off for its ZeRO-1/2
    # optimizer only (ZeRO-1 in bf16 uses BF16_Optimizer, which always computes it).
    zero_opt_12 = train.zero_stage == 2 or (train.zero_stage == 1 and not bf16_weights(train.precision, 1))
    if zero_opt_12 and optim.grad_clip == 0 and not optim.offload_optimizer:
        cfg["zero_optimization"]["compute_grad_norm"] = False
    if train.zero_stage in (1, 2):
        # DeepSpeed's default copies every gradient into the reduction bucket from a Python hook as backward
        # produces it (narrow, copy, stream bookkeeping per parameter tensor). Without it the hook only records
        # the gradient and each bucket is flattened once when it is reduced: the same values, bitwise (tested),
        # for a fraction of the CPU time per step (a CPU proxy with LaMamba-XL's 657 parameter tensors: 68 -> 13
        # ms of overhead per step over a plain PyTorch step), which is what bounds the step of a CPU-bound model.
        cfg["zero_optimization"]["contiguous_gradients"] = False
    if not on_cuda and num_params > 0 and train.zero_stage > 0:
        bucket = int(min(5e8, max(1 << 20, num_params)))
        cfg["zero_optimization"].update({"reduce_bucket_size": bucket, "allgather_bucket_size": bucket})
        if train.zero_stage == 3:
            cfg["zero_optimization"].update({"stage3_prefetch_bucket_size": bucket,
                                             "stage3_param_persistence_threshold": 0})
    # Always explicit: DeepSpeed's default (0.19) clips at 1.0, the paper recipe does not clip.
    cfg["gradient_clipping"] = float(optim.grad_clip)
    if train.zero_stage == 3:
        # Keep parameters partitioned between steps; gathering is done per module in forward.
        cfg["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    if optim.offload_optimizer:
        if train.zero_stage == 0:
            raise ValueError("[optim] offload_optimizer = true needs [train] zero_stage >= 1")
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(on_cuda)}
    if optim.warmup_steps > 0:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": optim.lr,
                "warmup_num_steps": optim.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return cfg
