"""The plain training step (lamamba_dist/train/step.py) that `lamamba bench` times and `lamamba parity` trains with:
its optimizer side per precision, and the same loss as the trainer's own step on the same weights and batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lamamba_dist.train.step import Bf16MasterWeights, TrainStep, model_boundary

ROOT = Path(__file__).resolve().parents[2]


def test_bf16_master_weights_step_the_fp32_copy_and_copy_it_back():
    """bf16 weights, an fp32 master stepped by AdamW on the fp32 copy of the bf16 gradients, and the weights are
    the master rounded to bf16 (DeepSpeed's bf16 mode in a plain loop)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lr, wd = 1e-2, 0.1
    mw = Bf16MasterWeights(model, lr, wd, fused=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and mw.master.dtype == torch.float32
    before = mw.master.detach().clone()
    x = torch.randn(32, 8)
    loss = model(x.to(torch.bfloat16)).float().pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    g = torch.cat([gr.reshape(-1).float() for gr in grads])
    mw.step(loss)
    # Adam's first step moves each weight by lr * sign(grad) (m / sqrt(v) = g / |g|), after the decoupled decay
    expect = before * (1 - lr * wd) - lr * torch.sign(g)
    moved = g.abs() > 1e-6
    assert torch.allclose(mw.master.detach()[moved], expect[moved], atol=1e-5)
    for p, v in zip(model.parameters(), mw.views):
        assert torch.equal(p.detach(), v.to(torch.bfloat16))
    assert mw.master.grad is None


def test_model_boundary_casts_the_input_and_returns_fp32():
    seen = []

    def forward(x, t, y=None):
        seen.append(x.dtype)
        return (x * 2).to(torch.bfloat16)

    out = model_boundary(forward, torch.bfloat16)(torch.ones(2), torch.zeros(2), y=None)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    out = model_boundary(forward, torch.float32)(torch.ones(2), torch.zeros(2), y=None)
    assert seen[-1] == torch.float32 and out.dtype == torch.float32


def test_fp32_step_is_the_plain_pytorch_loop_bitwise():
    """TrainStep in fp32 = the diffusion loss, backward, AdamW, zero_grad: the same weights after three steps."""
    from lamamba_dist.diffusion import create_diffusion
    from lamamba_dist.models import create_model

    diffusion = create_diffusion()
    torch.manual_seed(0)
    a = create_model("DiT-debug/2", resolution=32)
    b = create_model("DiT-debug/2", resolution=32)
    b.load_state_dict(a.state_dict())
    step = TrainStep(a, diffusion, "fp32", lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(2, 4, 4, 4, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        y = torch.randint(0, 10, (2,), generator=g)
        noise = torch.randn(2, 4, 4, 4, generator=g)
        got = step(x, t, y, noise)
        loss = diffusion.training_losses(b, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(got, loss.detach())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_precision_is_checked():
    from lamamba_dist.diffusion import create_diffusion

    with pytest.raises(ValueError, match="precision 'fp16'"):
        TrainStep(torch.nn.Linear(2, 2), create_diffusion(), "fp16")


SCRIPT = r"""
import json, sys, torch
from lamamba_dist.config import load_config
from lamamba_dist.train.engine import build_model
from lamamba_dist.train.step import TrainStep
from lamamba_dist.train.trainer import Trainer

precision, out_dir, config = sys.argv[1:4]
cfg = load_config(config, ['data.shards="synthetic"', 'data.num_workers=0', f'checkpoint.dir="{out_dir}"',
                           'model.name="DiT-debug/2"', 'model.resolution=32', f'train.precision="{precision}"',
                           'train.global_batch=2', 'train.micro_batch=2', 'model.class_dropout=0.0',
                           'logging.wandb=false'])
tr = Trainer(cfg, resume=False)
plain = build_model(cfg, None)
plain.load_state_dict({k: v.float() for k, v in tr.engine.module.state_dict().items()})
step = TrainStep(plain, tr.diffusion, precision)
batches = []
class Tap:
    def __init__(self, it): self.it = it
    def __next__(self):
        b = next(self.it)
        batches.append(b)
        return b
res = tr.train_step(Tap(iter(tr.loader)))
b = batches[0].to("cpu")
loss = step.loss(b["latent"], b["t"], b["label"], b["noise"])
print("RESULT " + json.dumps({"trainer": res["loss_sum"], "plain": float(loss)}))
tr.close()
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_trainer_step_computes_the_plain_step_loss(tmp_path, precision):
    """One definition of the step's loss: the trainer's (DeepSpeed engine, loader batch with its draws) equals the
    plain step's on the same weights and batch, bit for bit."""
    res = subprocess.run([sys.executable, "-c", SCRIPT, precision, str(tmp_path / "run"),
                          str(ROOT / "configs" / "debug.toml")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-6000:]
    out = json.loads(line[len("RESULT "):])
    assert out["trainer"] == out["plain"], out
