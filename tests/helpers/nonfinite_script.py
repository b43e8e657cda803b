"""Run under torchrun (2 ranks): the fused non-finite check (train/nonfinite.py) on every DeepSpeed optimizer path.

For each setup ``<stage>-<precision>`` given on the command line, from the same initial weights and data:

1. a clean step: the check passes, the step is applied, and the global grad norm is reported;
2. a NaN loss on rank 1 only: both ranks skip (master weights, Adam state, the LR warm-up schedule and
   DeepSpeed's step counter as they were, a skipped step counted);
3. a finite loss with one infinite gradient on rank 1 only: both ranks skip;
4. a clean step again: applied (the skip did not stick), weights move.

A ``-fused`` setup runs ZeRO-1/2's gradients through FusedGradients (train/ds_internals.py), as the trainer does.
Each rank appends ``NONFINITE_OK <setup> <optimizer kind> <device|host skip> <grad norm of step 1> rank<r>`` to
``$NONFINITE_RESULTS_DIR/rank<r>.txt``; the test compares the norms across setups.
"""


import deepspeed
import torch
import torch.distributed as dist

from lamamba_dist.config import OptimConfig, TrainConfig
from lamamba_dist.models import create_model
from lamamba_dist.train.ds_config import build_ds_config
from lamamba_dist.train.ds_internals import FusedGradients
from lamamba_dist.train.ema import ZeroEMA
from lamamba_dist.train.nonfinite import NonFiniteGuard
from train_helpers import report_line, run_setups


def adam_state(engine) -> list[torch.Tensor]:
    out = []
    for st in engine.optimizer.optimizer.state.values() if hasattr(engine.optimizer, "optimizer") else \
            engine.optimizer.state.values():
        out += [v.detach().clone() for v in st.values() if torch.is_tensor(v)]
    return out


def run(stage: int, precision: str, fused: bool = False):
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = create_model("LaMamba-debug", resolution=32, num_classes=10)
    tc = TrainConfig(global_batch=4, micro_batch=2, zero_stage=stage, precision=precision)
    ds = build_ds_config(tc, OptimConfig(lr=1e-3, warmup_steps=10), world, on_cuda=False,
                         num_params=sum(p.numel() for p in model.parameters()))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    grads = FusedGradients(engine, accum=1) if fused else None
    guard = NonFiniteGuard(engine, world_size=world, device=torch.device("cpu"))
    engine.lr_scheduler.step(4)  # mid warm-up: a non-zero LR that a skipped step must not advance
    ema = ZeroEMA(engine.module, 0.9, rank=rank)
    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
    g = torch.Generator().manual_seed(100 + rank)
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def step(nan_loss=False, inf_grad=False):
        x = torch.randn(2, 4, 4, 4, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        if nan_loss and rank == 1:
            x[0, 0, 0, 0] = float("nan")
        handle = None
        if inf_grad and rank == 1:
            handle = params[len(params) // 2].register_hook(lambda gr: torch.full_like(gr, float("inf")))
        out = (grads.forward if fused else engine)(x.to(dtype), t, y=y).float()
        loss = out.pow(2).mean()
        if fused:
            grads.backward(loss, boundary=True)
        else:
            engine.backward(loss)
        if handle is not None:
            handle.remove()
        guard.check(loss.detach(), stop=False)
        engine.step()
        verdict = guard.finish()
        applied = engine.was_step_applied() and not verdict.nonfinite
        if applied:
            ema.update()
        return verdict, applied

    v, applied = step()
    assert applied and not v.nonfinite and v.loss_sum == v.loss_sum, (v, applied)
    norm1 = guard.grad_norm()
    assert norm1 is not None and norm1 > 0, norm1
    for what in ("nan_loss", "inf_grad"):
        before = ema.full_master_weights(dst=None)
        adam_before = adam_state(engine)
        skipped_before = engine.skipped_steps
        lr_before, sched_before = engine.get_lr(), engine.lr_scheduler.last_batch_iteration
        v, applied = step(**{what: True})
        assert engine.get_lr() == lr_before and engine.lr_scheduler.last_batch_iteration == sched_before, \
            f"{what}: the LR schedule advanced ({sched_before} -> {engine.lr_scheduler.last_batch_iteration})"
        assert not applied, f"{what}: step applied"
        if what == "nan_loss":
            assert v.nonfinite, f"{what}: the check passed"
        after = ema.full_master_weights(dst=None)
        assert all(torch.equal(before[n], after[n]) for n in before), f"{what}: weights changed"
        adam_after = adam_state(engine)
        assert len(adam_before) == len(adam_after) and all(torch.equal(a, b) for a, b in zip(adam_before, adam_after)), \
            f"{what}: optimizer state changed"
        assert engine.skipped_steps == skipped_before + 1, f"{what}: skipped_steps {engine.skipped_steps}"
    before = ema.full_master_weights(dst=None)
    sched_before = engine.lr_scheduler.last_batch_iteration
    v, applied = step()
    assert applied and not v.nonfinite, "the skip stuck"
    assert engine.lr_scheduler.last_batch_iteration == sched_before + 1, "the LR schedule did not advance"
    after = ema.full_master_weights(dst=None)
    assert any(not torch.equal(before[n], after[n]) for n in before), "clean step after skips did not train"
    where = "device" if guard.skips_on_device else "host"
    report_line("NONFINITE_RESULTS_DIR", f"NONFINITE_OK {stage}-{precision}{'-fused' if fused else ''} {guard.kind} {where} {norm1!r} rank{rank}",
                rank)
    engine.destroy()


if __name__ == "__main__":
    run_setups(run)
