"""On-disk format of the VAE-latent WebDataset shards, shared by the writer and the loader.

One sample per source image, stored under a stable, sortable key (``00001234_n01440764_10026``:
the zero-padded index of the image in the sorted source file list, then its class folder and
file stem). Members of a sample::

    KEY.mean.npy     float16 (2, C, S, S)  posterior mean of [image, horizontally flipped image]
    KEY.logvar.npy   float16 (2, C, S, S)  posterior log-variance, same layout
    KEY.cls          ASCII class index (sorted class folder names, as torchvision's ImageFolder)
    KEY.json         {"path": source path relative to SRC, "label": int, "wnid": class folder}

Shards are named ``{split}-{index:06d}.tar``; members are written in key order with fixed
metadata (mtime 0, uid/gid 0, mode 0644), so the bytes of a shard are a pure function of its
samples. ``manifest.json`` next to the shards describes them (see ``lamamba_dist.data_pipeline.preprocess``).
No latent sample is drawn when writing: the loader draws ``z = (mean + exp(logvar/2) * eps) * scale``.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lamamba_dist.hashing import HashingWriter

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
FIELDS = ("mean.npy", "logvar.npy", "cls", "json")
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(index: int, wnid: str, stem: str, width: int = 8) -> str:
    """Stable key; sorts like the index; no dots (webdataset splits the extension at the first dot)."""
    return f"{index:0{width}d}_{_SAFE.sub('_', wnid)}_{_SAFE.sub('_', stem)}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple] = {}


def npy_load(data: bytes) -> np.ndarray:
    """np.load of an .npy member; headers already seen skip numpy's (slow, ast-based) header parser."""
    if data[:6] == b"\x93NUMPY" and data[6:7] == b"\x01" and len(data) >= 10:
        hlen = int.from_bytes(data[8:10], "little")
        header = data[10:10 + hlen]
        known = _NPY_HEADERS.get(header)
        if known is not None:
            dtype, shape, count = known
            arr = np.frombuffer(data, dtype=dtype, count=count, offset=10 + hlen)
            return arr.reshape(shape)
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if b"'fortran_order': False" in header and len(_NPY_HEADERS) < 64:  # C order only
            _NPY_HEADERS[header] = (arr.dtype, arr.shape, arr.size)
        return arr
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(key: str, mean: np.ndarray, logvar: np.ndarray, label: int, meta: dict) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in a fixed order."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    return [
        (f"{key}.mean.npy", npy_bytes(mean.astype(np.float16))),
        (f"{key}.logvar.npy", npy_bytes(logvar.astype(np.float16))),
        (f"{key}.cls", str(int(label)).encode()),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
    ]


def write_tar_atomic(path: str | Path, members: Iterable[tuple[str, bytes]]) -> tuple[str, int]:
    """Write ``members`` to ``path`` through ``path.tmp`` + fsync + rename; returns (sha256, bytes).

    Deterministic bytes: USTAR-compatible headers with mtime 0, uid/gid 0, empty owner names.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        hw = HashingWriter(f)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hw.sha.hexdigest(), hw.size


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> dict:
    """Read ``manifest.json`` (or the one inside a folder) with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"shard manifest not found: {path} (made by `lamamba preprocess`)")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("shards", "scale_factor", "latent_shape"):
        if key not in man:
            raise ValueError(f"{path}: manifest has no {key!r} key")
    if man.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {man.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return man
