"""Run under torchrun (2 ranks): ZeRO-2 with and without DeepSpeed's contiguous gradient buffer, same data.

The trainer turns ``contiguous_gradients`` off (ds_config.py) for its CPU cost; this checks that the reduced
gradient partitions and the weights after a few steps are bitwise the same either way. Each rank appends
``CONTIG_OK <precision> rank<r>`` to ``$CONTIG_RESULTS_DIR/rank<r>.txt``.
"""

import sys

import deepspeed
import torch
import torch.distributed as dist

from lamamba_dist.config import OptimConfig, TrainConfig
from lamamba_dist.models import create_model
from lamamba_dist.train.ds_config import build_ds_config
from lamamba_dist.train.ema import ZeroEMA
from train_helpers import report_line


def run(precision: str, contiguous: bool):
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model = create_model("LaMamba-debug", resolution=32, num_classes=10, class_dropout=0.0)
    tc = TrainConfig(global_batch=4, micro_batch=2, zero_stage=2, precision=precision)
    ds = build_ds_config(tc, OptimConfig(lr=1e-3), world, on_cuda=False,
                         num_params=sum(p.numel() for p in model.parameters()))
    assert ds["zero_optimization"]["contiguous_gradients"] is False  # the trainer's setting
    ds["zero_optimization"]["contiguous_gradients"] = contiguous
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ema = ZeroEMA(engine.module, 0.9, rank=rank)
    dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
    g = torch.Generator().manual_seed(100 + rank)
    first = None
    for i in range(3):
        x = torch.randn(2, 4, 4, 4, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        engine.backward(engine(x.to(dtype), t, y=y).float().pow(2).mean())
        if first is None:
            first = torch.cat([gr.reshape(-1).float() for grads in engine.optimizer.averaged_gradients.values()
                               for gr in grads])
        engine.step()
        ema.update()
    weights = ema.full_master_weights(dst=None)
    engine.destroy()
    return first, weights


if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    rank = dist.get_rank()
    for precision in sys.argv[1:]:
        g1, w1 = run(precision, True)
        g0, w0 = run(precision, False)
        assert torch.equal(g1, g0), f"{precision}: gradients differ, max {(g1 - g0).abs().max().item()}"
        assert all(torch.equal(w1[n], w0[n]) for n in w1), f"{precision}: weights differ after 3 steps"
        report_line("CONTIG_RESULTS_DIR", f"CONTIG_OK {precision} rank{rank}", rank)
    dist.barrier()
    dist.destroy_process_group()
