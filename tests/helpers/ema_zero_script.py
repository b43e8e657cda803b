"""Run under torchrun (2 ranks): ZeroEMA vs a plain PyTorch EMA of the full fp32 weights, for several ZeRO setups.

Each rank appends one line ``EMA_OK <setup> <n tensors> rank<r>`` per setup that matches bit for bit to
``$EMA_RESULTS_DIR/rank<r>.txt`` (one file per rank: the ranks' shared stdout interleaves their lines).
"""


import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from lamamba_dist.config import OptimConfig, TrainConfig
from lamamba_dist.models import create_model
from lamamba_dist.train.ds_config import build_ds_config
from lamamba_dist.train.ema import ZeroEMA
from train_helpers import report_line, run_setups


def full_fp32(engine, params):
    """Full fp32 master weights through DeepSpeed's own API (collective), as the reference sees them."""
    out = {}
    for n, p in params:
        if engine.zero_optimization_stage() == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[n] = p.detach().float().clone()
        elif hasattr(p, "_hp_mapping"):
            out[n] = safe_get_full_fp32_param(p).detach().float().clone()
        else:
            out[n] = p.detach().float().clone()
    return out


def run(stage: int, precision: str, decay: float = 0.9, steps: int = 4):
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = create_model("LaMamba-debug", resolution=32, num_classes=10)
    n_params = sum(p.numel() for p in model.parameters())
    tc = TrainConfig(global_batch=4, micro_batch=2, zero_stage=stage, precision=precision)
    ds = build_ds_config(tc, OptimConfig(lr=1e-3), world, on_cuda=False, num_params=n_params)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ema = ZeroEMA(engine.module, decay, rank=rank)
    params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if stage == 3:
        assert all(p.numel() == 0 or p.ds_tensor.numel() < p.ds_numel for _, p in params), "not partitioned"
    plain = full_fp32(engine, params)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(2, 4, 4, 4, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        out = engine(x.to(dtype), t, y)
        loss = out.float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update()
        now = full_fp32(engine, params)
        for n in plain:  # DiT's update_ema, in plain PyTorch on full tensors
            plain[n].mul_(decay).add_(now[n], alpha=1 - decay)
    full = ema.full_state_dict(dst=None)
    assert sorted(full) == sorted(plain)
    changed = 0
    for n in plain:
        assert full[n].shape == plain[n].shape, n
        assert torch.equal(full[n], plain[n]), f"{n}: max diff {(full[n] - plain[n]).abs().max().item()}"
        changed += int(not torch.equal(plain[n], now[n]))
    assert changed > len(plain) // 2, "EMA did not move away from the weights: test too weak"
    # Round trip through the world-size independent file format.
    ema2 = ZeroEMA(engine.module, decay, rank=rank)
    ema2.load_full_state_dict(full)
    again = ema2.full_state_dict(dst=None)
    assert all(torch.equal(again[n], full[n]) for n in full)
    master = ema.full_master_weights(dst=None)
    assert all(torch.equal(master[n], now[n]) for n in now)
    report_line("EMA_RESULTS_DIR", f"EMA_OK zero{stage}-{precision} {len(full)} rank{rank}", rank)
    engine.destroy()


if __name__ == "__main__":
    run_setups(run)
