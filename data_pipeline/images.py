"""Source scanning and image decoding for preprocessing (no Ray, no torch).

Class index = position of the class folder in the sorted list of folders, exactly as torchvision's
``ImageFolder``. Images are cropped with ADM's ``center_crop_arr`` (guided-diffusion, used by DiT and
LaMamba-Diff): halve with a box filter while the short side is >= 2x the target, bicubic-resize the
short side to the target, centre crop.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SourceError(ValueError):
    """The source folder is missing, empty or not ImageNet-style."""


@dataclass(frozen=True)
class SourceImage:
    index: int  # position in the sorted file list
    rel: str  # path relative to the split folder, "wnid/file.JPEG"
    label: int
    wnid: str


def split_folder(src: str | Path, split: str) -> Path:
    """``SRC/split`` when it exists (an ImageNet root), else ``SRC`` itself (already a split folder)."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"source folder not found: {src}")
    if not src.is_dir():
        raise SourceError(f"source is not a folder: {src}")
    return src / split if (src / split).is_dir() else src


def scan_source(folder: str | Path) -> tuple[list[str], list[SourceImage], list[str]]:
    """Sorted class folders, the sorted image list, and warnings (empty classes, ignored files, skips).

    Symbolic links are followed, but every real directory and every real file is taken once: a link loop
    (``n01/loop -> ..``) or a second link to the same folder is reported and skipped, and an image's label is
    always its class folder directly under ``folder``. Only regular files are listed: a FIFO, socket or device
    named like an image is reported and never opened (opening a FIFO blocks), as is a dangling link.
    """
    folder = Path(folder)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise SourceError(f"{folder}: no class folders (expected {folder}/<wnid>/*.JPEG)")
    images, warnings, ignored = [], [], 0
    seen_dirs: dict[str, str] = {}  # real path -> the first path it was reached by
    seen_files: dict[str, str] = {}
    skipped: list[str] = []
    src_real = os.path.realpath(folder)
    class_real = {os.path.realpath(folder / w): w for w in classes}

    def owner(real: str):
        """The class folder whose real tree holds ``real`` (the deepest one), or None."""
        best = None
        for path, w in class_real.items():
            if (real == path or real.startswith(path + os.sep)) and (best is None or len(path) > len(best[0])):
                best = (path, w)
        return best[1] if best else None

    for label, wnid in enumerate(classes):
        names = []
        for root, dirs, files in os.walk(folder / wnid, followlinks=True):
            real = os.path.realpath(root)
            rel_root = os.path.relpath(root, folder)
            if real in seen_dirs:
                skipped.append(f"{rel_root}: the same directory as {seen_dirs[real]} (a link loop or a second link); "
                               "not scanned again")
                dirs[:] = []
                continue
            own = owner(real)
            if real == src_real or src_real.startswith(real + os.sep) or (own is not None and own != wnid):
                where = f"class folder {own}" if own is not None and own != wnid else "the source folder itself"
                skipped.append(f"{rel_root}: a link into {where}; its images keep the label of their own class folder")
                dirs[:] = []
                continue
            seen_dirs[real] = rel_root
            dirs.sort()
            for f in sorted(files):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, folder)
                if not f.lower().endswith(IMG_EXTENSIONS):
                    ignored += 1
                    continue
                try:
                    st = os.stat(path)  # follows links; never opens the file
                except OSError as e:
                    skipped.append(f"{rel}: cannot stat ({e.strerror or e}), e.g. a dangling link")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a file")
                    skipped.append(f"{rel}: {kind}, not a regular file; not opened")
                    continue
                real_file = os.path.realpath(path)
                if real_file in seen_files:
                    skipped.append(f"{rel}: the same file as {seen_files[real_file]}; taken once")
                    continue
                seen_files[real_file] = rel
                names.append(rel)
        if not names:
            warnings.append(f"class folder {wnid} holds no image file")
        for rel in sorted(names):
            images.append((rel, label, wnid))
    if not images:
        raise SourceError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} class folder(s)")
    if ignored:
        warnings.append(f"{ignored} file(s) without an image extension ignored")
    warnings += [f"skipped {s}" for s in skipped]
    return classes, [SourceImage(i, rel, label, wnid) for i, (rel, label, wnid) in enumerate(images)], warnings


def file_list_digest(images: list[SourceImage]) -> str:
    """Identity of the source listing (paths and labels), to refuse resuming onto another source."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.rel}\t{im.label}\n".encode())
    return h.hexdigest()


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's center crop (guided_diffusion/image_datasets.py), returns uint8 (size, size, 3)."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


# Reads run on these threads so that a read that never returns (a hung network mount) costs a thread, not the job.
_READERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lamamba-read")
READ_TIMEOUT_S = 120.0  # `lamamba preprocess --read-timeout`


def _read_bytes(path: str | Path) -> bytes:
    if not stat.S_ISREG(os.stat(path).st_mode):  # checked again here: the file may have changed since the scan
        raise OSError(f"not a regular file: {path}")
    with open(path, "rb") as f:
        return f.read()


def read_file(path: str | Path, timeout: float = READ_TIMEOUT_S) -> bytes:
    """The file's bytes, or TimeoutError after ``timeout`` seconds (the stalled read is left on its thread)."""
    global _READERS
    fut = _READERS.submit(_read_bytes, path)
    try:
        return fut.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        # The stuck thread cannot be stopped: give later reads fresh threads rather than queue behind it.
        _READERS.shutdown(wait=False)
        _READERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="lamamba-read")
        raise TimeoutError(f"read timed out after {timeout:g} s") from None


def load_image(path: str | Path, image_size: int, min_side: int,
               timeout: float = READ_TIMEOUT_S) -> tuple[np.ndarray | None, str]:
    """Read (within ``timeout`` seconds), decode, convert to RGB and crop one image.

    Returns (uint8 array, note) on success, where note names a conversion ("" when none:
    "CMYK->RGB", "L->RGB" for greyscale, "RGBA->RGB", "upscaled 40x30"...), or (None, reason) when the
    image is skipped (unreadable, a read that stalls, truncated, smaller than ``min_side`` on its short side).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_file(path, timeout)
    except TimeoutError as e:
        return None, f"unreadable: {e} (a hung mount?)"
    except OSError as e:
        return None, f"unreadable: {type(e).__name__}: {e}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # truncated files fail here, not at open()
            mode, size = img.mode, img.size
            notes = []
            if min(size) < min_side:
                return None, f"too small: {size[0]}x{size[1]} < {min_side} px on the short side"
            if mode != "RGB":
                notes.append(f"{mode}->RGB")
                img = img.convert("RGB")
            if min(size) < image_size:
                notes.append(f"upscaled {size[0]}x{size[1]}")
            arr = center_crop_arr(img, image_size)
    except UnidentifiedImageError:
        return None, "not a decodable image"
    except Image.DecompressionBombError as e:
        return None, f"too large: {e}"
    except (OSError, SyntaxError, ValueError) as e:
        return None, f"unreadable: {type(e).__name__}: {e}"
    if arr.shape != (image_size, image_size, 3) or arr.dtype != np.uint8:
        return None, f"unexpected array {arr.shape} {arr.dtype} after conversion"
    return arr, "; ".join(notes)
