"""Reading the latent shards for training: a ``[data] shards`` value resolved to its manifest and shard files,
one shard's tar read into its samples' raw members, a sample parsed into its posterior and label, and the labels
checked against the model's classes. A sample that cannot be used comes back as a :class:`_Bad` naming why; the
loader (loader.py) replaces it and counts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lamamba_dist.data.shards import MANIFEST_NAME, npy_load, read_manifest
from lamamba_dist.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int


def resolve_shards(spec: str) -> tuple[dict, list[ShardInfo], Path]:
    """``spec`` = a shard folder, its manifest.json, or a glob/brace pattern of shards inside one folder."""
    p = Path(spec)
    if p.is_dir() or p.name == MANIFEST_NAME:
        folder = p if p.is_dir() else p.parent
        man = read_manifest(folder)
        wanted = None
    else:
        import glob

        from braceexpand import braceexpand

        files = sorted({f for pat in braceexpand(spec) for f in glob.glob(pat)})
        if not files:
            raise DataError(f"[data] shards = {spec!r}: no shard folder, manifest or shard file matches")
        folders = {str(Path(f).parent) for f in files}
        if len(folders) != 1:
            raise DataError(f"[data] shards = {spec!r}: matches files in several folders ({', '.join(sorted(folders))})")
        folder = Path(folders.pop())
        man = read_manifest(folder)
        wanted = {Path(f).name for f in files}
        known = {s["name"] for s in man["shards"]}
        unknown = sorted(wanted - known)
        if unknown:
            raise DataError(f"[data] shards = {spec!r}: {unknown[0]} is not listed in {folder / MANIFEST_NAME}")
    if not man.get("complete", False):
        log.warning("%s: the preprocessing job has not finished (manifest 'complete' is false); "
                    "serving the %d shards written so far", folder / MANIFEST_NAME, len(man["shards"]))
    infos = [ShardInfo(str(folder / s["name"]), int(s["count"])) for s in sorted(man["shards"], key=lambda s: s["name"])
             if (wanted is None or s["name"] in wanted) and int(s["count"]) > 0]
    if not infos:
        raise DataError(f"[data] shards = {spec!r}: the manifest lists no non-empty shard")
    return man, infos, folder


@dataclass
class _Bad:
    key: str
    reason: str


def read_shard(url: str, count: int) -> list:
    """Read one shard into a list of ``count`` entries: the sample's raw members (a dict) or a _Bad.

    A truncated or corrupt tar yields the samples read before the damage; the rest are _Bad.
    """
    import webdataset as wds
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    groups: list[dict] = []
    error = None
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # missing file, unreadable pipe...
        return [_Bad(f"#{i}", f"cannot open shard: {e}") for i in range(count)]
    try:
        for item in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(item["fname"])
            if prefix is None:
                continue
            if not groups or groups[-1]["__key__"] != prefix:
                groups.append({"__key__": prefix})
            groups[-1][suffix.lower()] = item["data"]
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors...
        error = f"tar unreadable after {len(groups)} sample(s): {type(e).__name__}: {e}"
    finally:
        try:
            stream.close()
        except Exception:
            pass
    if error is not None and groups:
        groups.pop()  # the sample being read when the tar broke may be incomplete
    out: list = []
    for g in groups[:count]:
        missing = [m for m in ("mean.npy", "logvar.npy", "cls") if m not in g]
        out.append(_Bad(g["__key__"], f"missing member(s) {', '.join(missing)}") if missing else g)
    if len(groups) > count:
        log.warning("%s: %d samples in the tar, the manifest says %d; extra samples ignored", url, len(groups), count)
    reason = error or f"sample missing: the tar holds {len(groups)} samples, the manifest {count}"
    while len(out) < count:
        out.append(_Bad(f"#{len(out)}", reason))
    return out


def parse_sample(g: dict, latent_shape: tuple):
    """Raw members -> dict(key, mean, logvar, label), or a _Bad naming what is wrong."""
    key = g["__key__"]
    try:
        mean, logvar = npy_load(g["mean.npy"]), npy_load(g["logvar.npy"])
        label = int(g["cls"].decode().strip())
    except Exception as e:
        return _Bad(key, f"undecodable member: {type(e).__name__}: {e}")
    want = (2,) + tuple(latent_shape)
    if mean.shape != want or logvar.shape != want:
        return _Bad(key, f"latent shape {mean.shape}/{logvar.shape}, expected {want}")
    if not (np.isfinite(mean).all() and np.isfinite(logvar).all()):
        return _Bad(key, "non-finite latent (NaN or inf)")
    return dict(key=key, mean=mean, logvar=logvar, label=label)


def check_label_range(man: dict, infos: list, folder: Path, num_classes: int) -> None:
    """Refuse shards whose labels reach ``num_classes``: label ``num_classes`` is the model's classifier-free
    guidance null class, so such samples would silently train as unconditional ones."""
    names = {Path(i.url).name for i in infos}
    top = -1
    per_shard = [s.get("class_histogram") for s in man["shards"] if s["name"] in names]
    if per_shard and all(h is not None for h in per_shard):
        labels = [int(k) for h in per_shard for k, v in h.items() if v]
        top = max(labels) if labels else -1
        how = "class histograms"
    elif man.get("num_classes") is not None:
        top = int(man["num_classes"]) - 1
        how = "num_classes"
    else:
        log.warning("%s: no class histograms or num_classes: labels not checked against [model] num_classes = %d",
                    folder / MANIFEST_NAME, num_classes)
        return
    if top >= num_classes:
        raise DataError(f"{folder / MANIFEST_NAME}: labels go up to {top} (from its {how}), but [model] num_classes = "
                        f"{num_classes}: label {num_classes} is the classifier-free guidance null class and larger "
                        f"ones do not exist; set [model] num_classes to at least {top + 1}")
