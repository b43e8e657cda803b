"""What reaches the model inside the DeepSpeed engine, per precision mode (one CPU rank, the trainer's own step).

DeepSpeed's bf16 mode holds bf16 weights and disables any ``torch.autocast`` around the module, so every input
must arrive in the weights' dtype: the trainer casts at the model boundary. An fp32 input meeting bf16 weights
fails on the GPU (``Input type (float) and bias type (c10::BFloat16) should be the same``) while the CPU kernels
may accept it, so this test checks the dtypes themselves: every Linear and Conv2d input has its weight's dtype.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys, torch
from lamamba_dist.config import load_config
from lamamba_dist.train.trainer import Trainer

model, precision, stage, out_dir = sys.argv[1:5]
cfg = load_config(sys.argv[5], ['data.shards="synthetic"', 'data.num_workers=0', f'checkpoint.dir="{out_dir}"',
                                 f'model.name="{model}"', 'model.resolution=32', f'train.precision="{precision}"',
                                 f'train.zero_stage={stage}', 'train.global_batch=2', 'train.micro_batch=2',
                                 'logging.wandb=false'])
tr = Trainer(cfg, resume=False)
seen = []
def hook(mod, args):
    x = args[0]
    seen.append([type(mod).__name__, str(x.dtype), str(mod.weight.dtype), torch.is_autocast_enabled(x.device.type)])
for m in tr.engine.module.modules():
    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
        m.register_forward_pre_hook(hook)
misaligned = [n for n, p in tr.engine.module.named_parameters() if p.data_ptr() % 16 and p.numel() % 8 == 0]
res = tr.train_step(iter(tr.loader))
print("RESULT " + json.dumps({"seen": seen, "applied": res["applied"], "loss": res["loss_sum"],
                              "model_dtype": str(tr.model_dtype), "misaligned": misaligned}))
tr.close()
"""


@pytest.mark.parametrize("model,precision,stage,weights,autocast", [
    ("LaMamba-debug", "bf16", 2, "torch.bfloat16", False),
    ("DiT-S/2", "bf16", 2, "torch.bfloat16", False),
    ("LaMamba-debug", "bf16", 0, "torch.float32", True),  # ZeRO-0: DeepSpeed's autocast (ds_config.py)
    ("LaMamba-debug", "bf16_autocast", 2, "torch.float32", True),
])
def test_model_inputs_match_the_weights_dtype_inside_the_engine(tmp_path, model, precision, stage, weights, autocast):
    from train_helpers import train_env

    res = subprocess.run([sys.executable, "-c", SCRIPT, model, precision, str(stage), str(tmp_path),
                          str(ROOT / "configs" / "debug.toml")], cwd=ROOT, env=train_env(), capture_output=True,
                         text=True, timeout=600)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert res.returncode == 0 and line, res.stdout[-3000:] + res.stderr[-6000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["applied"] and out["loss"] == out["loss"], out
    assert out["model_dtype"] == ("torch.bfloat16" if weights == "torch.bfloat16" else "torch.float32")
    assert out["seen"], "no Linear/Conv2d ran"
    # Every weight whose size is a multiple of 8 elements starts on a 16-byte boundary inside DeepSpeed's flat
    # buffers (ds_config.aligned_param_order): compiled blocks fail on the GPU with "misaligned address" otherwise
    # (LaMamba-debug/S/B/L have relative-position tables whose sizes are not multiples of 8 elements).
    assert out["misaligned"] == [], out["misaligned"]
    for kind, x_dtype, w_dtype, in_autocast in out["seen"]:
        assert w_dtype == weights, (kind, w_dtype)
        assert in_autocast == autocast, (kind, in_autocast)
        if not autocast:  # no autocast to reconcile them: the input must already be in the weights' dtype
            assert x_dtype == w_dtype, f"{kind}: {x_dtype} input, {w_dtype} weight"
