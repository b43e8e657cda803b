"""Run under torchrun (2 ranks): ZeRO-1/2 gradients through FusedGradients (train/ds_internals.py) against
DeepSpeed's own per-parameter path, same weights and data, 2 micro-batches per step.

For each ``<stage>-<precision>`` argument: this rank's reduced gradient partition of the first step, and the fp32
master weights and Adam state after 3 steps, must be bitwise equal. Each rank appends
``FUSED_OK <stage>-<precision> rank<r>`` to ``$FUSED_RESULTS_DIR/rank<r>.txt``.
"""

import deepspeed
import torch
import torch.distributed as dist

from lamamba_dist.config import OptimConfig, TrainConfig
from lamamba_dist.models import create_model
from lamamba_dist.train.ds_config import build_ds_config
from lamamba_dist.train.ds_internals import FusedGradients
from lamamba_dist.train.ema import ZeroEMA
from train_helpers import report_line, run_setups

ACCUM = 2


def run_path(stage: int, precision: str, fused: bool):
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = create_model("LaMamba-debug", resolution=32, num_classes=10, class_dropout=0.0)
    tc = TrainConfig(global_batch=2 * ACCUM * world, micro_batch=2, zero_stage=stage, precision=precision)
    ds = build_ds_config(tc, OptimConfig(lr=1e-3), world, on_cuda=False,
                         num_params=sum(p.numel() for p in model.parameters()))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    grads = FusedGradients(engine, ACCUM) if fused else None
    if fused:
        assert not engine.optimizer._grad_acc_hooks  # DeepSpeed's per-parameter hooks are gone
    ema = ZeroEMA(engine.module, 0.9, rank=rank)
    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
    g = torch.Generator().manual_seed(100 + rank)
    first = None
    for _ in range(3):
        for micro in range(ACCUM):
            x = torch.randn(2, 4, 4, 4, generator=g)
            t = torch.randint(0, 1000, (2,), generator=g)
            y = torch.randint(0, 10, (2,), generator=g)
            forward = grads.forward if fused else engine
            loss = forward(x.to(dtype), t, y=y).float().pow(2).mean()
            if fused:
                grads.backward(loss, boundary=micro == ACCUM - 1)
            else:
                engine.backward(loss)
            if first is None and micro == ACCUM - 1:
                first = torch.cat([gr.reshape(-1).float() for part in engine.optimizer.averaged_gradients.values()
                                   for gr in part])
            engine.step()
        assert engine.was_step_applied()
        assert all(p.grad is None for p in engine.module.parameters()), "gradients left on the module"
        ema.update()
    weights = ema.full_master_weights(dst=None)
    state = [v.clone() for st in engine.optimizer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    module = [p.detach().clone() for p in engine.module.parameters()]
    if fused:
        check_rebinding(engine.optimizer)
    engine.destroy()
    return first, weights, state, module


def views_of_flat(opt, i: int) -> bool:
    flat = opt.bit16_groups_flat[i]
    off = 0
    for p in opt.bit16_groups[i]:
        if p.data_ptr() != flat.data_ptr() + off * flat.element_size():
            return False
        off += p.numel()
    return True


def check_rebinding(opt):
    """The weights are still views of the flat buffers after the steps (step() no longer re-points them), and
    are re-pointed when a flat buffer moves (as offloading and reloading move it)."""
    assert all(views_of_flat(opt, i) for i in range(len(opt.bit16_groups)))
    flat = opt.bit16_groups_flat[0]
    flat.data = flat.data.clone()
    assert not views_of_flat(opt, 0)
    opt._update_model_bit16_weights(0)
    assert views_of_flat(opt, 0), "the weights were not re-pointed at the moved flat buffer"


def run(stage: int, precision: str):
    g0, w0, s0, m0 = run_path(stage, precision, fused=False)
    g1, w1, s1, m1 = run_path(stage, precision, fused=True)
    what = f"{stage}-{precision}"
    assert g0.shape == g1.shape, f"{what}: partition sizes differ ({g0.shape} vs {g1.shape})"
    assert torch.equal(g0, g1), f"{what}: gradients differ, max {(g0 - g1).abs().max().item()}"
    assert all(torch.equal(w0[n], w1[n]) for n in w0), f"{what}: weights differ after 3 steps"
    assert len(s0) == len(s1) and all(torch.equal(a, b) for a, b in zip(s0, s1)), f"{what}: Adam state differs"
    assert all(torch.equal(a, b) for a, b in zip(m0, m1)), f"{what}: the module's weights differ after 3 steps"
    report_line("FUSED_RESULTS_DIR", f"FUSED_OK {what} rank{dist.get_rank()}", dist.get_rank())


if __name__ == "__main__":
    run_setups(run)
