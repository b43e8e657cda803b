"""Import checkpoints written by the official LaMamba-Diff code (`lamamba convert-official`).

Our parameter names equal the official ones, so conversion is: pick the state dict (``ema`` by default,
as the official sample.py does), strip wrapper prefixes, drop the buffers we recompute
(``relative_position_index``, ``attn_mask``), infer the architecture from the shapes, match it against the
registry, and load strictly, so that any missing, unexpected or mis-shaped key is refused by name.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from lamamba_dist.weights import strip_wrapper_prefixes

RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")


def official_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop the buffers that we rebuild from the geometry (docs/model.md §5, §10)."""
    sd = strip_wrapper_prefixes(state_dict)
    return {k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] not in RECOMPUTED_BUFFERS}


def infer_architecture(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Read C0, depths, heads, window, resolution and classes off the tensor shapes."""
    try:
        _, s, _, c0 = sd["pos_embed"].shape
        table = sd["y_embedder.embedding_table.weight"]
    except KeyError as e:
        raise KeyError(f"not a LaMamba-Diff state dict: key {e.args[0]!r} is missing") from None

    def count(prefix: str) -> int:
        ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k)] if m}
        return max(ids) + 1 if ids else 0

    depths = tuple(count(f"layers.{i}.") for i in range(4))
    mid = count("mid_layer.")
    dec = tuple(count(f"layers_up.{j}.") for j in range(4))
    if dec != tuple(d + 1 for d in reversed(depths)):
        raise ValueError(f"decoder depths {dec} are not encoder depths {depths} reversed + 1 (SD_UNET_DECODER_DESIGN)")
    heads = sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[1]
    window = max(int(round((math.isqrt(v.shape[0]) + 1) / 2)) for k, v in sd.items()
                 if k.endswith("attn.relative_position_bias_table"))
    rows = table.shape[0]
    num_classes = rows - 1 if rows > 1 else 0
    out_ch = sd["final_linear.weight"].shape[0]
    d_inner = sd["layers.0.blocks.0.op.in_proj.weight"].shape[0] // 2
    d_state = sd["layers.0.blocks.0.op.A_logs"].shape[1]
    return dict(base_width=c0, depths=depths, mid_depth=mid, num_heads=heads, window_size=window,
                d_state=d_state, ssm_ratio=d_inner / c0, resolution=s * 8, num_classes=num_classes,
                learn_sigma=out_ch == 8)


def match_registry(arch: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registry name, architecture overrides) for an inferred architecture; overrides empty on an exact match."""
    from lamamba_dist.models import MODELS, LaMambaArch

    keys = ("base_width", "depths", "mid_depth", "num_heads", "window_size", "d_state", "ssm_ratio")
    wanted = {k: arch[k] for k in keys}
    best = None
    for name, (family, kw) in MODELS.items():
        if family != "lamamba":
            continue
        full = LaMambaArch(**kw)
        have = {k: getattr(full, k) for k in keys}
        diff = {k: v for k, v in wanted.items() if have[k] != v}
        if not diff:
            return name, {}
        if have["base_width"] == wanted["base_width"] and (best is None or len(diff) < len(best[1])):
            best = (name, diff)
    if best is None:
        raise ValueError(f"no registered LaMamba size has base width {arch['base_width']}; inferred {wanted}")
    return best


class _Stub:
    """Stands in for classes we do not have (yacs CfgNode, ...) when unpickling a trusted file."""

    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Stub


class _LenientPickle:
    Unpickler = _LenientUnpickler

    @staticmethod
    def load(f, **kw):
        return _LenientUnpickler(f, **kw).load()


def load_official_checkpoint(path: str | Path, key: str = "ema", trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict under ``key`` ("ema" or "model") of an official train.py checkpoint, or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise ValueError(
                f"{path}: holds pickled Python objects beyond tensors (official checkpoints store argparse/yacs "
                f"configs); if you trust this file, rerun with --trust-pickle. ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)
        except Exception as e2:
            raise ValueError(f"{path}: cannot be read as a torch checkpoint ({type(e2).__name__}: {e2})") from None
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        return obj[key]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise KeyError(f"{path}: no state dict under {key!r} (top-level keys: {keys})")


def convert(in_path: str | Path, out_path: str | Path, key: str = "ema", trust_pickle: bool = False) -> dict[str, Any]:
    from lamamba_dist.models import create_model, load_state_dict_strict
    from lamamba_dist.weights import save_weights

    sd = official_to_ours(load_official_checkpoint(in_path, key, trust_pickle))
    arch = infer_architecture(sd)
    name, overrides = match_registry(arch)
    model = create_model(name, resolution=arch["resolution"], num_classes=arch["num_classes"],
                         learn_sigma=arch["learn_sigma"], **overrides)
    load_state_dict_strict(model, sd, source=str(in_path))
    meta = dict(model=name, resolution=arch["resolution"], num_classes=arch["num_classes"],
                learn_sigma=arch["learn_sigma"], arch_overrides=overrides, source="official", source_key=key)
    save_weights(out_path, model.state_dict(), meta)
    return meta


def add_parser(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text, description=(
        "Convert a checkpoint saved by the official LaMamba-Diff train.py (dict with model/ema/opt/args/config, "
        "or a bare state dict) into a lamamba safetensors weights file usable by `lamamba sample`."))
    p.add_argument("input", help="official checkpoint (.pt)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--key", default="ema", choices=("ema", "model"), help="which weights to take (default: ema)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling the argparse/yacs objects stored in official checkpoints (trusted files only)")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    from lamamba_dist.errors import CLIError

    try:
        meta = convert(args.input, args.output, args.key, args.trust_pickle)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise CLIError(str(e).strip("'\"")) from None
    print(f"wrote {args.output}: {meta['model']} @ {meta['resolution']}px, {meta['num_classes']} classes"
          + (f", overrides {meta['arch_overrides']}" if meta["arch_overrides"] else ""))
    return 0
