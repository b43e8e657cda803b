"""``lamamba preprocess``: ImageNet-style folder -> ADM centre crop -> VAE posterior -> WebDataset shards, on Ray.

What a user can rely on:

* **Stable shards.** The sorted file list (class folders sorted, as ImageFolder) gives every image an
  index and a key (:func:`lamamba_dist.data.shards.sample_key`). A seeded permutation of the indices
  (``--order-seed``, recorded) cut into chunks of ``--shard-size`` defines shard i =
  ``{split}-{i:06d}.tar`` (class-mixed shards; samples inside a shard in key order). Shard i holds
  ``shard_size`` samples minus the images of its chunk that had to be skipped (the last one is
  shorter). Everything is a pure function of the file list and the settings.
* **Atomic, verified, resumable.** Each shard is written to ``NAME.tmp``, fsynced and renamed, then the
  manifest is rewritten atomically. A rerun of the same command keeps the shards whose sha256 matches
  the manifest and encodes only the rest, so a killed job is finished by running it again; the result
  is byte-identical to an uninterrupted run (the encoder is batch-invariant, see data_pipeline/vae.py,
  and no latent is sampled here; CPU actors always run one torch thread, whose results do not depend on
  the machine). Byte-identity needs the same kind of encode device (CPU, or one GPU model) for both
  runs. A rerun with other settings or another source is refused.
* **Bad images** are converted where possible (CMYK, greyscale, palette, alpha -> RGB; small images
  upscaled) and listed with the conversion; unreadable, truncated and too-small ones are skipped and
  listed with the reason.

Ray: decoding runs as Ray Data tasks, encoding in an actor pool (one actor per GPU when the cluster
has GPUs, otherwise CPU actors with fractional CPUs so read tasks always get a core: on a 2-core machine, actors
that hold every CPU leave the read tasks none and the pipeline deadlocks). The driver assembles and writes the shards, so OUT must be
writable from the driver (on a multi-node cluster SRC must be readable by every node).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lamamba_dist.data.shards import (FORMAT_VERSION, MANIFEST_NAME, encode_sample, sample_key, shard_name,
                                      write_json_atomic, write_tar_atomic)
from lamamba_dist.data_pipeline.images import (READ_TIMEOUT_S, SourceError, SourceImage, file_list_digest,
                                               load_image, scan_source, split_folder)
from lamamba_dist.hashing import sha256_file

log = logging.getLogger(__name__)

# Test hook: seconds to sleep after each shard is written, so a test can kill the job mid-way.
_DELAY_ENV = "LAMAMBA_PREPROCESS_SHARD_DELAY"


class PreprocessError(ValueError):
    """A user error: bad source, mismatched existing output, unusable settings."""


@dataclass
class Settings:
    src: str
    out: str
    resolution: int
    vae: str
    split: str = "train"
    shard_size: int = 1000
    order_seed: int = 0
    min_side: int = 16
    dtype: str = "fp32"
    encode_batch: int = 16
    address: Optional[str] = None
    num_actors: int = 0  # 0 = one per GPU, or a CPU-based default
    object_store_memory: Optional[int] = None
    num_cpus: Optional[int] = None  # only for a local cluster started here
    progress: bool = True
    read_timeout: float = READ_TIMEOUT_S  # seconds per source file read before it is skipped as unreadable


# --------------------------------------------------------------------------- the plan


def plan_shards(n: int, shard_size: int, order_seed: int) -> list[list[int]]:
    """Shard i = sorted(perm[i*shard_size:(i+1)*shard_size]) for a seeded permutation of range(n)."""
    perm = np.random.default_rng(order_seed).permutation(n) if order_seed >= 0 else np.arange(n)
    return [sorted(int(i) for i in perm[a:a + shard_size]) for a in range(0, n, shard_size)]


def _settings_record(st: Settings, folder: Path, classes: list[str], images: list[SourceImage], scale: float,
                     vae_id: dict) -> dict:
    """What must be equal for a rerun to continue an existing output."""
    return {
        "format_version": FORMAT_VERSION,
        "source": str(folder.resolve()),
        "split": st.split,
        "resolution": st.resolution,
        **vae_id,
        "scale_factor": scale,
        "encode_dtype": st.dtype,
        "dtype": "float16",
        "latent_shape": [2, 4, st.resolution // 8, st.resolution // 8],
        "latent_layout": "(flip, channel, height, width): flip 0 = image, 1 = horizontal mirror",
        "members": {"mean.npy": "posterior mean", "logvar.npy": "posterior log-variance", "cls": "class index",
                    "json": "source path, label, wnid"},
        "shard_size": st.shard_size,
        "order_seed": st.order_seed,
        "min_side": st.min_side,
        "crop": "ADM center_crop_arr",
        "num_classes": len(classes),
        "classes": classes,
        "num_images": len(images),
        "file_list_sha256": file_list_digest(images),
    }


# Not "source": the same listing moved to another path may be continued.
_MUST_MATCH = ("format_version", "split", "resolution", "vae", "vae_weights_sha256", "scale_factor",
               "encode_dtype", "shard_size", "order_seed", "min_side", "num_images", "file_list_sha256")


def _check_existing(manifest_path: Path, want: dict) -> dict | None:
    import json

    if not manifest_path.is_file():
        return None
    try:
        old = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreprocessError(f"{manifest_path}: existing manifest is not valid JSON ({e}); "
                              f"move it away to start over") from None
    for k in _MUST_MATCH:
        if old.get(k) != want.get(k):
            raise PreprocessError(f"{manifest_path} was made with {k} = {old.get(k)!r}, this run has {want.get(k)!r}; "
                                  f"use another OUT folder (or delete this one) to change settings or source")
    return old


# --------------------------------------------------------------------------- Ray stages


def decode_batch(batch: dict, folder: str, resolution: int, min_side: int,
                 read_timeout: float = READ_TIMEOUT_S) -> dict:
    """Ray Data task: read (each file within ``read_timeout`` s) + convert + crop; failed images become zero arrays
    with a non-empty status."""
    n = len(batch["rel"])
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    status, note = [], []
    for i, rel in enumerate(batch["rel"]):
        arr, msg = load_image(os.path.join(folder, str(rel)), resolution, min_side, timeout=read_timeout)
        if arr is None:
            status.append(msg)
            note.append("")
        else:
            images[i] = arr
            status.append("")
            note.append(msg)
    out = {k: batch[k] for k in ("index", "rel", "label", "shard")}
    out.update(image=images, status=np.array(status, dtype=object), note=np.array(note, dtype=object))
    return out


class EncodeActor:
    """Ray Data actor: posterior of the decoded images (skipped rows get zero latents, ignored later)."""

    def __init__(self, vae: str, device: str, dtype: str, encode_batch: int, threads: int):
        from lamamba_dist.data_pipeline.vae import VaeEncoder

        self.enc = VaeEncoder(vae, device=device, dtype=dtype, encode_batch=encode_batch, threads=threads)
        try:  # where this actor runs (the driver counts the images encoded per node)
            import ray.util

            self.node = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray (tests call the actor directly)
            self.node = "local"

    def __call__(self, batch: dict) -> dict:
        ok = np.array([s == "" for s in batch["status"]], dtype=bool)
        images = batch.pop("image")
        n, s = len(ok), images.shape[1] // 8
        mean = np.zeros((n, 2, 4, s, s), np.float16)
        logvar = np.zeros_like(mean)
        if ok.any():
            m, lv = self.enc.encode(images[ok])
            mean[ok], logvar[ok] = m, lv
        batch.update(mean=mean, logvar=logvar, node=np.array([self.node] * n, dtype=object))
        return batch


# --------------------------------------------------------------------------- the driver-side writer


class ShardWriter:
    """Collects encoded rows per shard; writes a shard and updates the manifest once all its rows arrived."""

    def __init__(self, out: Path, split: str, plan: list[list[int]], images: list[SourceImage], record: dict,
                 done: dict[int, dict], key_width: int):
        self.out, self.split, self.plan, self.images = out, split, plan, images
        self.record, self.done, self.key_width = record, dict(done), key_width
        self.pending: dict[int, dict[int, dict]] = collections.defaultdict(dict)
        self.delay = float(os.environ.get(_DELAY_ENV, "0") or 0)

    def key(self, index: int) -> str:
        im = self.images[index]
        return sample_key(index, im.wnid, Path(im.rel).stem, self.key_width)

    def add_batch(self, batch: dict) -> int:
        n = len(batch["index"])
        for i in range(n):
            sid = int(batch["shard"][i])
            self.pending[sid][int(batch["index"][i])] = {
                "status": str(batch["status"][i]), "note": str(batch["note"][i]),
                "mean": batch["mean"][i], "logvar": batch["logvar"][i],
            }
            if len(self.pending[sid]) == len(self.plan[sid]):
                self._write(sid, self.pending.pop(sid))
        return n

    def _write(self, sid: int, rows: dict[int, dict]) -> None:
        members, skipped, converted = [], [], []
        hist: collections.Counter = collections.Counter()
        keys = []
        for idx in self.plan[sid]:  # ascending index == ascending key
            r, im, key = rows[idx], self.images[idx], self.key(idx)
            if r["status"]:
                skipped.append({"path": im.rel, "key": key, "reason": r["status"]})
                continue
            if r["note"]:
                converted.append({"path": im.rel, "key": key, "conversion": r["note"]})
            members += encode_sample(key, r["mean"], r["logvar"], im.label,
                                     {"path": im.rel, "label": im.label, "wnid": im.wnid})
            hist[im.label] += 1
            keys.append(key)
        name = shard_name(self.split, sid)
        sha, size = write_tar_atomic(self.out / name, members)
        self.done[sid] = {
            "name": name, "count": len(keys), "sha256": sha, "bytes": size, "sources": len(self.plan[sid]),
            "first_key": keys[0] if keys else None, "last_key": keys[-1] if keys else None,
            "class_histogram": {str(k): v for k, v in sorted(hist.items())},
            "skipped": skipped, "converted": converted,
        }
        self.write_manifest(complete=False)
        if self.delay:
            time.sleep(self.delay)

    def write_manifest(self, complete: bool) -> dict:
        shards = [self.done[i] for i in sorted(self.done)]
        skipped = [s for sh in shards for s in sh["skipped"]]
        converted = [c for sh in shards for c in sh["converted"]]
        reasons = collections.Counter(s["reason"].split(":")[0] for s in skipped)
        conversions = collections.Counter(c for cv in converted for c in [x.split(" ")[0] for x in cv["conversion"].split("; ")])
        hist: collections.Counter = collections.Counter()
        for sh in shards:
            hist.update({int(k): v for k, v in sh["class_histogram"].items()})
        man = dict(self.record)
        man.update(
            complete=complete,
            num_shards=len(self.plan),
            shards=shards,
            images_seen=sum(sh["sources"] for sh in shards),
            images_written=sum(sh["count"] for sh in shards),
            images_skipped=len(skipped),
            skipped_reasons=dict(sorted(reasons.items())),
            skipped=skipped,
            images_converted=len(converted),
            conversions=dict(sorted(conversions.items())),
            converted=converted,
            class_histogram={str(k): v for k, v in sorted(hist.items())},
        )
        write_json_atomic(self.out / MANIFEST_NAME, man)
        return man


# --------------------------------------------------------------------------- the job


def _ray_init(st: Settings):
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)
    if st.address:
        ray.init(address=st.address, **kw)
    else:
        if st.object_store_memory:
            kw["object_store_memory"] = st.object_store_memory
        if st.num_cpus:
            kw["num_cpus"] = st.num_cpus
        # "local": always a new cluster; a bare ray.init() would join whatever /tmp/ray/ray_current_cluster names.
        ray.init(address="local", **kw)
    return True


def _encoder_layout(st: Settings) -> tuple[int, dict, str, int, float]:
    """(actors, per-actor resources, device, torch threads, CPUs per decode task) for the connected cluster.

    The decode tasks' CPU request always differs from the actors': Ray Data fuses a task stage into the
    next actor stage when their resource requests are equal, and decoding would then run serially
    inside the encoder actors instead of beside them.
    """
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus > 0:
        n = st.num_actors or gpus
        return n, {"num_gpus": 1, "num_cpus": 1}, "cuda", max(1, int(cpus // max(1, n)) // 2), 1.0
    # One torch thread per CPU actor, always: CPU convolution results depend (by an ulp) on the thread
    # count, and the shard bytes must not depend on the machine. Parallelism comes from more actors.
    # Leave at least half of the CPUs to the decode tasks: actors that take every core starve the
    # read tasks and the pipeline hangs; hence 0.5 CPU per actor on small machines.
    n = st.num_actors or max(1, int(cpus) // 2)
    per = 1.0 if n <= cpus / 2 else 0.5
    if cpus <= 2:
        per = 0.5
    return n, {"num_cpus": per}, "cpu", 1, (0.75 if per == 0.5 else 0.5)


def run_preprocess(st: Settings) -> dict:
    """Run (or finish) the job; returns the final manifest."""
    from lamamba_dist.data_pipeline.vae import VaeError, load_vae

    if st.resolution % 8 != 0 or st.resolution < 16:
        raise PreprocessError(f"resolution {st.resolution}: must be a multiple of 8 and >= 16")
    if st.shard_size < 1 or st.encode_batch < 1:
        raise PreprocessError("--shard-size and --encode-batch must be >= 1")
    try:
        folder = split_folder(st.src, st.split)
        classes, images, warnings = scan_source(folder)
    except SourceError as e:
        raise PreprocessError(str(e)) from None
    for w in warnings:
        log.warning("%s: %s", folder, w)
    try:
        scale = float(load_vae(st.vae).config.scaling_factor)  # fail fast on a bad --vae, before Ray starts
    except VaeError as e:
        raise PreprocessError(str(e)) from None
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    from lamamba_dist.runlock import LockedError, RunLock

    try:
        lock = RunLock(out, "lamamba preprocess", log=lambda m: log.warning("%s", m)).acquire()
    except LockedError as e:
        raise PreprocessError(str(e)) from None
    try:
        return _run_locked(st, out, folder, classes, images, scale)
    finally:
        lock.release()


def _run_locked(st: Settings, out: Path, folder: Path, classes: list[str], images: list[SourceImage],
                scale: float) -> dict:
    from tqdm import tqdm

    from lamamba_dist.data_pipeline.vae import vae_identity

    record = _settings_record(st, folder, classes, images, scale, vae_identity(st.vae))
    old = _check_existing(out / MANIFEST_NAME, record)
    plan = plan_shards(len(images), st.shard_size, st.order_seed)
    for tmp in out.glob("*.tmp"):  # leftovers of a killed job
        tmp.unlink()
    done: dict[int, dict] = {}
    for sh in (old or {}).get("shards", []):
        sid = int(sh["name"].rsplit("-", 1)[1].split(".")[0])
        p = out / sh["name"]
        if p.is_file() and p.stat().st_size == sh["bytes"] and sha256_file(p) == sh["sha256"]:
            done[sid] = sh
        else:
            log.warning("%s: missing or does not match the manifest's sha256; it is made again", p)
    key_width = max(8, len(str(len(images) - 1)))
    writer = ShardWriter(out, st.split, plan, images, record, done, key_width)
    todo = [sid for sid in range(len(plan)) if sid not in done]
    rows = [{"index": i, "rel": images[i].rel, "label": images[i].label, "shard": sid} for sid in todo for i in plan[sid]]
    log.info("%s: %d images in %d classes -> %d shards (%d already verified, %d to make)",
             folder, len(images), len(classes), len(plan), len(done), len(todo))
    if rows:
        _run_ray(st, str(folder), rows, writer, tqdm)
    missing = [sid for sid in range(len(plan)) if sid not in writer.done]
    if missing:
        raise RuntimeError(f"internal error: shards {missing[:5]} were not written")
    return writer.write_manifest(complete=True)


def _run_ray(st: Settings, folder: str, rows: list[dict], writer: ShardWriter, tqdm) -> None:
    import ray
    import ray.data

    started = _ray_init(st)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        n_actors, res, device, threads, decode_cpus = _encoder_layout(st)
        # at least two blocks per encoder (a block goes to one encoder: a small job would leave actors idle)
        blocks = min(len(rows), max(2 * n_actors, math.ceil(len(rows) / max(128, st.encode_batch))))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(decode_batch, fn_kwargs=dict(folder=folder, resolution=st.resolution, min_side=st.min_side,
                                                         read_timeout=st.read_timeout),
                            batch_size=max(8, st.encode_batch), num_cpus=decode_cpus)
        ds = ds.map_batches(EncodeActor, fn_constructor_kwargs=dict(vae=st.vae, device=device, dtype=st.dtype,
                                                                    encode_batch=st.encode_batch, threads=threads),
                            batch_size=st.encode_batch, compute=ray.data.ActorPoolStrategy(size=n_actors),
                            scheduling_strategy="SPREAD", **res)  # the encoders over every node, not packed on one
        per_node: collections.Counter = collections.Counter()
        with tqdm(total=len(rows), desc="encode", unit="img", disable=not st.progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                per_node.update(str(x) for x in batch.get("node", ()))
                bar.update(writer.add_batch(batch))
        nodes = {str(n["NodeManagerAddress"]) for n in ray.nodes() if n.get("Alive")}
        log.info("images encoded per Ray node (%d node(s) alive): %s", len(nodes),
                 json.dumps(dict(sorted(per_node.items()))))
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------- CLI


def add_parser(sub, name: str, help_text: str) -> None:
    from lamamba_dist.data_pipeline.vae import DEFAULT_VAE, DTYPES

    p = sub.add_parser(name, help=help_text, description=(
        "Encode an ImageNet-style folder (SRC/train/<wnid>/*.JPEG, or SRC/<wnid>/*.JPEG) into WebDataset shards of "
        "VAE posteriors (mean and log-variance of each image and its mirror, fp16) plus manifest.json, with Ray. "
        "Running the same command again verifies finished shards and completes a killed job."))
    p.add_argument("src", metavar="SRC", help="ImageNet root (with SPLIT/ inside) or the split folder itself")
    p.add_argument("out", metavar="OUT", help="output folder for SPLIT-NNNNNN.tar and manifest.json")
    p.add_argument("--resolution", type=int, required=True, choices=(256, 512))
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"AutoencoderKL folder or hub id (default {DEFAULT_VAE})")
    p.add_argument("--split", default="train")
    p.add_argument("--shard-size", type=int, default=1000, help="source images per shard (default 1000)")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the image -> shard assignment (-1: sorted order)")
    p.add_argument("--min-side", type=int, default=16, help="skip images whose short side is smaller (px)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="VAE compute dtype (stored latents are fp16)")
    p.add_argument("--encode-batch", type=int, default=16, help="images per VAE forward (x2 with mirrors)")
    p.add_argument("--address", default=None, help="existing Ray cluster (e.g. auto or ray://host:10001); "
                   "default: start a local one")
    p.add_argument("--num-actors", type=int, default=0, help="encoder actors (default: one per GPU, else CPUs/2)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--object-store-memory", type=int, default=None, help="bytes, local cluster only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT_S,
                   help="seconds to read one source file before skipping it as unreadable (a hung mount)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    import json

    from lamamba_dist.errors import CLIError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    st = Settings(src=args.src, out=args.out, resolution=args.resolution, vae=args.vae, split=args.split,
                  shard_size=args.shard_size, order_seed=args.order_seed, min_side=args.min_side, dtype=args.dtype,
                  encode_batch=args.encode_batch, address=args.address, num_actors=args.num_actors,
                  object_store_memory=args.object_store_memory, num_cpus=args.num_cpus, progress=not args.no_progress,
                  read_timeout=args.read_timeout)
    if not args.read_timeout > 0:
        raise CLIError(f"--read-timeout {args.read_timeout}: must be > 0")
    if args.address and (args.num_cpus or args.object_store_memory):
        raise CLIError("--num-cpus and --object-store-memory size a local Ray cluster; with --address the "
                       "cluster's own resources are used")
    try:
        man = run_preprocess(st)
    except PreprocessError as e:
        raise CLIError(str(e)) from None
    summary = {k: man[k] for k in ("num_shards", "images_seen", "images_written", "images_skipped",
                                   "skipped_reasons", "images_converted", "conversions")}
    print(json.dumps({"out": str(Path(args.out) / MANIFEST_NAME), **summary}, indent=1))
    return 0
