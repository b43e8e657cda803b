"""Profile one training step of a model on CUDA and print the top kernels by GPU time (for perf work).

    python scripts/profile_step.py --model LaMamba-XL --resolution 256 --batch 64 [--rows 30]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lamamba_dist.diffusion import create_diffusion
from lamamba_dist.models import create_model

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="LaMamba-XL")
ap.add_argument("--resolution", type=int, default=256)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--rows", type=int, default=30)
ap.add_argument("--compile", action="store_true")
args = ap.parse_args()
torch.backends.cuda.matmul.allow_tf32 = True
m = create_model(args.model, resolution=args.resolution).cuda().train()
if args.compile:
    from lamamba_dist.models.compile import compile_blocks

    compile_blocks(m)
fwd = m
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
diff = create_diffusion()
s = m.latent_size
x = torch.randn(args.batch, 4, s, s, device="cuda")
y = torch.randint(0, 1000, (args.batch,), device="cuda")


def step():
    t = diff.sample_t(args.batch, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = diff.training_losses(fwd, x, t, model_kwargs=dict(y=y))["loss"].mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    step()
    torch.cuda.synchronize()
ka = prof.key_averages()
print(ka.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
n_kernels = sum(e.count for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
print("kernel launches per step:", n_kernels)
