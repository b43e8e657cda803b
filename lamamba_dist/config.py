"""Typed experiment configuration, one TOML file per experiment.

Every section of the file maps to one frozen-ish dataclass below, and each
component receives only its own section (the model gets ``ModelConfig``, the
data loader ``DataConfig``...). Loading is strict: an unknown key, a value of the
wrong type or a value out of range raises :class:`ConfigError` naming the file
and the dotted key, e.g. ``configs/x.toml: [optim] lr = -1.0: must be > 0``.

Validation rules live next to the fields as metadata:

    lr: float = field(default=1e-4, metadata=dict(gt=0))
    stage: int = field(default=2, metadata=dict(choices=(0, 1, 2, 3)))
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name: str = field(default="LaMamba-debug", metadata=dict(help="registry name, see `lamamba models`"))
    resolution: int = field(default=256, metadata=dict(choices=(32, 64, 128, 256, 512), help="image side in pixels"))
    num_classes: int = field(default=1000, metadata=dict(ge=0))
    class_dropout: float = field(default=0.1, metadata=dict(ge=0.0, le=1.0))
    learn_sigma: bool = True
    grad_checkpointing: bool = False
    # "auto" (= "mixed"): on CUDA the Triton scan for sequences up to 1024 steps, mamba-ssm's for longer ones
    # (ops/selective_scan.py); references elsewhere. "fused" / "triton" force one kernel (A/B runs).
    # "ss2d_triton" (opt-in): SS2D gathers its scan from the channels-last map (ops/ss2d_triton.py).
    scan_backend: str = field(default="auto", metadata=dict(
        choices=("auto", "fused", "triton", "mixed", "reference", "ss2d_triton", "ss2d_reference")))
    # Window attention (ops/window_attention.py): "auto" (= "sdpa"), "sdpa", "flash", "reference", "triton" (opt-in:
    # ops/window_attention_triton.py, the bias and its gradient inside the kernels)
    attn_backend: str = field(default="auto", metadata=dict(choices=("auto", "sdpa", "flash", "reference", "triton")))
    # SS2D's depthwise conv + SiLU (ops/dwconv.py): "auto" (= "triton" on CUDA, "torch" elsewhere), "torch", "triton",
    # "triton_tiles" (the Triton conv's former tile kernels, for A/B runs)
    conv_backend: str = field(default="auto", metadata=dict(choices=("auto", "torch", "triton", "triton_tiles")))
    # SS2D's merge of the four scan directions and its adjoint (ops/cross_scan.py): "torch" (gathers + transpose),
    # "triton" (ops/cross_scan_triton.py, CUDA) or "auto" (= "triton" on CUDA, "torch" elsewhere)
    snake_backend: str = field(default="auto", metadata=dict(choices=("auto", "torch", "triton", "fused")))
    # How SS2D's lean scan core reaches autograd (ops/ss2d_core.py): "function" (traced into compiled graphs, where
    # the partitioner saves the four snake copies it meant to recompute), "op" (custom ops: a compiled block keeps
    # what the core keeps eagerly) or "auto" (= "op", the faster and leaner in a compiled step: docs/performance.md)
    scan_core: str = field(default="auto", metadata=dict(choices=("auto", "function", "op")))
    # Architecture fields replacing the registry's for ``name`` (``create_model(**arch_overrides)``), e.g.
    # ``arch_overrides = { base_width = 384, num_heads = 16 }``: a config-only model (configs/lamamba_XXL_256.toml).
    # Saved in checkpoints and weight files, so resume, export and sampling rebuild the same model.
    arch_overrides: dict = field(default_factory=dict)


@dataclass
class DiffusionConfig:
    num_timesteps: int = field(default=1000, metadata=dict(ge=1))
    beta_schedule: str = field(default="linear", metadata=dict(choices=("linear", "cosine")))
    learn_sigma: bool = True
    sample_steps: int = field(default=250, metadata=dict(ge=1))
    sampler: str = field(default="ddpm", metadata=dict(choices=("ddpm", "ddim")))
    cfg_scale: float = field(default=1.5, metadata=dict(ge=1.0))
    guidance_channels: str = field(default="all", metadata=dict(choices=("all", "first3")))


@dataclass
class DataConfig:
    # "synthetic" = seeded random latents (benchmarks, smoke tests); otherwise the folder written by
    # `lamamba preprocess` (or its manifest.json, or a glob/brace pattern of some of its shards).
    shards: str = "synthetic"
    num_workers: int = field(default=2, metadata=dict(ge=0))
    # Virtual streams the epoch is cut into (lamamba_dist/data/loader.py). Must be divisible by every
    # world size the run may use; with global_batch % num_streams == 0 the global batches are identical
    # on any world size (e.g. 64 for batch 256 on 1-64 GPUs). 0 = world_size on a fresh start, the
    # saved value on resume.
    num_streams: int = field(default=0, metadata=dict(ge=0))
    seed: int = 0  # mixed with the training seed: changes the data order alone
    flip: bool = True  # random choice between the stored latents of the image and of its mirror
    max_bad_samples: int = field(default=100, metadata=dict(ge=0))
    prefetch_factor: int = field(default=2, metadata=dict(ge=1))
    synthetic_num_classes: int = field(default=1000, metadata=dict(ge=1))


@dataclass
class OptimConfig:
    lr: float = field(default=1e-4, metadata=dict(gt=0))
    betas: tuple = (0.9, 0.999)
    eps: float = field(default=1e-8, metadata=dict(gt=0))
    weight_decay: float = field(default=0.01, metadata=dict(ge=0))  # torch AdamW default, as the official code
    warmup_steps: int = field(default=0, metadata=dict(ge=0))
    grad_clip: float = field(default=0.0, metadata=dict(ge=0))  # 0 = off (paper recipe)
    ema_decay: float = field(default=0.9999, metadata=dict(ge=0.0, le=1.0))
    # CUDA: the EMA update on a stream of its own, beside the next step's forward and backward (the same bits;
    # lamamba_dist/train/ema.py). Off: after the optimizer step on the training stream.
    ema_overlap: bool = False
    offload_optimizer: bool = False


@dataclass
class TrainConfig:
    global_batch: int = field(default=256, metadata=dict(ge=1))
    micro_batch: int = field(default=32, metadata=dict(ge=1))
    steps: int = field(default=400_000, metadata=dict(ge=1))
    # bf16: DeepSpeed bf16 (bf16 weights, fp32 master weights); bf16_autocast: fp32 weights + torch.autocast
    # (train/ds_config.py); fp32.
    precision: str = field(default="bf16", metadata=dict(choices=("fp32", "bf16", "bf16_autocast")))
    zero_stage: int = field(default=2, metadata=dict(choices=(0, 1, 2, 3)))
    # ZeRO-1/2 gradients: "fused" (one flat reduction per step, no per-parameter hooks; the gradients of a whole
    # step exist at the end of its backward) or "deepspeed" (DeepSpeed's per-parameter hooks, which let ZeRO-2 on
    # several ranks release gradients bucket by bucket during the backward). train/ds_internals.py: FusedGradients.
    grad_reduction: str = field(default="fused", metadata=dict(choices=("fused", "deepspeed")))
    seed: int = 0
    deterministic: bool = False
    compile: bool = False  # regional torch.compile of every block (lamamba_dist.models.compile); ZeRO 0-2
    # With compile: torch.compile's mode; "reduce-overhead" replays each block as a CUDA graph (models/compile.py)
    compile_mode: str = field(default="default", metadata=dict(
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")))
    # With compile: AOT autograd's activation memory budget (1 = torch's default; lower recomputes more in the
    # backward to keep less; lamamba_dist.models.compile.set_activation_memory_budget)
    compile_memory_budget: float = field(default=1.0, metadata=dict(ge=0.0, le=1.0))
    # With compile: also the modules between LaMamba-Diff's stages (patch merging / expanding), not only the blocks
    # (faster in a whole step: docs/performance.md, "The modules between the stages compiled"); false: the blocks only
    compile_glue: bool = True
    log_every: int = field(default=50, metadata=dict(ge=1))
    max_nonfinite_in_row: int = field(default=3, metadata=dict(ge=1))  # skipped steps in a row -> roll back
    max_rollbacks: int = field(default=3, metadata=dict(ge=0))  # rollbacks in one run before giving up (exit 1)
    # Save and exit with EXIT_REQUEUE (3) after this many steps of one invocation (time-boxed jobs, tests); 0 = off.
    exit_after: int = field(default=0, metadata=dict(ge=0))
    # What a researcher watches during a run (lamamba_dist/train/watch.py). Every sample_every steps: a grid of
    # sample_classes (empty: the first min(8, num_classes)) x sample_per_class images from the EMA weights, DDIM
    # with sample_steps steps and CFG scale sample_cfg_scale, fixed noise (sample_seed), in RUN/samples/
    # step_XXXXXXXX.png (and wandb). 0 = off.
    sample_every: int = field(default=0, metadata=dict(ge=0))
    sample_classes: tuple = ()
    sample_per_class: int = field(default=4, metadata=dict(ge=1))
    sample_steps: int = field(default=50, metadata=dict(ge=1))
    sample_cfg_scale: float = field(default=4.0, metadata=dict(ge=1.0))
    sample_seed: int = 0
    # Every fid_every steps: FID of fid_samples EMA samples (DDIM fid_steps steps, CFG fid_cfg_scale, random classes
    # fixed by sample_seed) against fid_reference (an ADM reference batch .npz), with the Inception weights
    # fid_inception (default: $LAMAMBA_INCEPTION), logged to stats.jsonl and wandb. With a few thousand samples
    # this follows the trend of a run; it is not the paper's 50k-sample FID and not comparable to it. 0 = off.
    fid_every: int = field(default=0, metadata=dict(ge=0))
    fid_samples: int = field(default=5000, metadata=dict(ge=2))
    fid_reference: str = ""
    fid_inception: str = ""
    fid_steps: int = field(default=50, metadata=dict(ge=1))
    fid_cfg_scale: float = field(default=1.5, metadata=dict(ge=1.0))


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    every: int = field(default=5000, metadata=dict(ge=1))
    keep: int = field(default=3, metadata=dict(ge=2))
    # How a checkpoint is verified before it is resumed from: "hash" (sizes + sha256 of every file) or "size".
    verify: str = field(default="hash", metadata=dict(choices=("hash", "size")))
    # Periodic saves in the background (training waits only for the copy to host memory: train/checkpointing.py).
    # Saves at stop time (signals, exit_after, the end of training) are always synchronous.
    background: bool = True
    # Also write the raw fp32 weights as model.safetensors (the EMA is always written). Off: a leaner checkpoint;
    # `lamamba export --raw` rebuilds them from the DeepSpeed state.
    inference_weights: bool = False


@dataclass
class LoggingConfig:
    wandb: bool = False
    project: str = "lamamba"
    entity: str = ""
    run_name: str = ""


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = field(default="<defaults>", metadata=dict(internal=True))


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false, got {type(value).__name__}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value):  # TOML has inf and nan; no setting here means either
            raise ConfigError(f"{where} = {value!r}: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string, got {type(value).__name__}")
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected an array, got {type(value).__name__}")
        return tuple(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected an array, got {type(value).__name__}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return dict(value)
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _check_range(value: Any, meta: dict, where: str) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(repr(c) for c in meta['choices'])}")
    for key, op, text in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                          ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
        if key in meta and not op(value, meta[key]):
            raise ConfigError(f"{where} = {value!r}: must be {text} {meta[key]}")


def section_from_dict(cls: type, data: dict, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``; ``where`` prefixes error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = section_from_dict(tp, value, f"[{name}]" if not where else key)
            continue
        v = _coerce(value, tp, key)
        _check_range(v, f.metadata, key)
        kwargs[name] = v
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "<dict>") -> ExperimentConfig:
    try:
        cfg = section_from_dict(ExperimentConfig, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg.source = source
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Load a TOML experiment file, then apply ``section.key=value`` overrides (TOML values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for ov in overrides or []:
        apply_override(data, ov, str(path))
    return config_from_dict(data, str(path))


def apply_override(data: dict, override: str, source: str = "<override>") -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"override {override!r}: expected section.key=value (for example train.steps=1000)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: name=LaMamba-XL
    node = data
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:i + 1])} is a value, not a table, so "
                              f"{'.'.join(parts[:i + 2])} does not exist")
    node[parts[-1]] = value


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks that no single field can express."""
    src = cfg.source
    t = cfg.train
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
                                  and math.isfinite(b) for b in betas):
        raise ConfigError(f"{src}: [optim] betas = {list(betas)!r}: expected two numbers in [0, 1)")
    if t.global_batch % t.micro_batch != 0:
        raise ConfigError(f"{src}: [train] global_batch = {t.global_batch} is not a multiple of micro_batch = {t.micro_batch}")
    for k, v in cfg.model.arch_overrides.items():
        if isinstance(v, dict):
            raise ConfigError(f"{src}: [model] arch_overrides.{k}: expected a value, got a table")
    nc = cfg.model.num_classes
    bad = [c for c in t.sample_classes if not (isinstance(c, int) and not isinstance(c, bool) and 0 <= c < max(nc, 1))]
    if bad:
        raise ConfigError(f"{src}: [train] sample_classes = {list(t.sample_classes)!r}: {bad} not in 0..{nc - 1} "
                          f"([model] num_classes = {nc})")
    if t.fid_every:
        import os

        if not t.fid_reference:
            raise ConfigError(f"{src}: [train] fid_every = {t.fid_every} needs fid_reference, the reference batch "
                              "(.npz, ADM format) to compare the samples with")
        if not os.path.isfile(os.path.expanduser(t.fid_reference)):
            raise ConfigError(f"{src}: [train] fid_reference = {t.fid_reference!r}: no such file")
        inception = t.fid_inception or os.environ.get("LAMAMBA_INCEPTION", "")
        if not inception or not os.path.isfile(os.path.expanduser(inception)):
            raise ConfigError(f"{src}: [train] fid_every = {t.fid_every} needs the Inception weights: fid_inception "
                              f"= {inception!r} is not a file (set fid_inception or $LAMAMBA_INCEPTION; nothing is "
                              "downloaded at run time)")
        if cfg.data.shards == "synthetic":
            raise ConfigError(f"{src}: [train] fid_every needs images: [data] shards = \"synthetic\" has no VAE to "
                              "decode the samples with")
    if cfg.model.resolution % 8 != 0:
        raise ConfigError(f"{src}: [model] resolution = {cfg.model.resolution}: must be a multiple of 8 (VAE factor)")


def arch_overrides(model_cfg) -> dict:
    """``[model] arch_overrides`` as ``create_model`` keyword arguments (TOML arrays become tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (model_cfg.arch_overrides or {}).items()}


def model_kwargs(model_cfg) -> dict:
    """Every ``create_model`` keyword argument of a ``[model]`` section except the name."""
    m = model_cfg
    return dict(resolution=m.resolution, num_classes=m.num_classes, class_dropout=m.class_dropout,
                learn_sigma=m.learn_sigma, grad_checkpointing=m.grad_checkpointing, scan_backend=m.scan_backend,
                attn_backend=m.attn_backend, conv_backend=m.conv_backend, snake_backend=m.snake_backend,
                scan_core=m.scan_core, **arch_overrides(m))


def to_dict(cfg: Any) -> dict:
    """Plain dict (TOML/JSON-friendly) of a config or section."""
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else
                                                                         dict(v) if isinstance(v, dict) else v)
    return out
