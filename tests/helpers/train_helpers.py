"""Launch `lamamba train` under torchrun on CPU (gloo, fp32) and compare what runs leave behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = ROOT / "configs" / "debug.toml"


def train_env(extra: dict | None = None, drop: tuple = ()) -> dict:
    env = dict(os.environ)
    env.update({
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),  # the shm op builds once (~50 s)
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "WANDB_MODE": env.get("WANDB_MODE", "offline"),
    })
    for k in drop:
        env.pop(k, None)
    env.update(extra or {})
    return env


def launch(run_dir: Path, nproc: int = 2, sets: tuple = (), env: dict | None = None, drop_env: tuple = (),
           config: Path = DEBUG_CONFIG, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "lamamba_dist.cli", "train", "--config", str(config), "--set", f'checkpoint.dir="{run_dir}"']
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, cwd=ROOT, env=train_env(env, drop_env), capture_output=True, text=True, timeout=timeout)
    res.log = f"$ {' '.join(cmd)}\n--- rc {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"
    return res


def losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it in stats.jsonl (a step re-run after a resume appears twice)."""
    out: dict[int, list[float]] = {}
    for line in (Path(run_dir) / "stats.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None and "event" not in rec:
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step_{step:08d}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def raw(step: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's raw fp32 weights (model.safetensors when written, else rebuilt from the DeepSpeed state)."""
    from lamamba_dist.train.checkpoint import raw_weights

    return raw_weights(step)


def _flatten(obj, prefix="", out=None):
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}/{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}/{i}", out)
    return out


def optimizer_tensors(step: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every DeepSpeed optimizer-state file of a checkpoint (Adam moments, fp32 partitions)."""
    out = {}
    state = step / "ds" / "state"
    files = sorted(state.glob("*optim_states.pt")) or sorted(state.glob("*model_states.pt"))
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=False)
        _flatten(sd.get("optimizer_state_dict", sd.get("optimizer", {})), f.name, out)
    return out


def assert_same_tensors(a: dict, b: dict, what: str, exact: bool = True, rtol: float = 0.0, atol: float = 0.0):
    assert sorted(a) == sorted(b), f"{what}: different keys"
    assert a, f"{what}: nothing to compare"
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs (max abs diff {(a[k].double() - b[k].double()).abs().max().item():.3g})"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {k}: {m}")


def report_line(env_var: str, line: str, rank: int) -> None:
    """For scripts run under torchrun: print ``line`` and append it to ``$env_var/rank<rank>.txt`` (one file per rank:
    the ranks' shared stdout interleaves their lines)."""
    print(line, flush=True)
    with open(os.path.join(os.environ[env_var], f"rank{rank}.txt"), "a") as f:
        f.write(line + "\n")


def run_setups(run) -> None:
    """Main of a torchrun script: one process group, ``run(stage, precision)`` per ``<stage>-<precision>`` argument,
    ``run(stage, precision, fused=True)`` per ``<stage>-<precision>-fused`` (ZeRO-1/2 through FusedGradients)."""
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=None, auto_mpi_discovery=False, verbose=False)
    for spec in sys.argv[1:]:
        stage, precision, *fused = spec.split("-")
        run(int(stage), precision, **({"fused": True} if fused == ["fused"] else {}))
    dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def read_only_folder(path: Path):
    """``path`` (an existing folder) made unwritable for the block; yields the error text a write then gets.

    Permission bits when not root; as root (CI), which ignores them, the immutable attribute (``chattr +i``).
    Skips the test when neither is possible here."""
    import pytest

    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield "Permission denied"
        finally:
            os.chmod(path, 0o755)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root, which ignores permission bits, and this filesystem refuses the immutable "
                    "attribute (chattr +i): no way to make a read-only folder here")
    try:
        yield "Operation not permitted"
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
