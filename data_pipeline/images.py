"""Source scanning and image decoding for preprocessing (no Ray, no torch).

Class index = position of the class folder in the sorted list of folders, exactly as torchvision's
``ImageFolder``. Images are cropped with ADM's ``center_crop_arr`` (guided-diffusion, used by DiT and
LaMamba-Diff): halve with a box filter while the short side is >= 2x the target, bicubic-resize the
short side to the target, centre crop.
"""

from __future__ import annotations

import hashlib
import os
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
    """Sorted class folders, the sorted image list, and warnings (empty classes, ignored files)."""
    folder = Path(folder)
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise SourceError(f"{folder}: no class folders (expected {folder}/<wnid>/*.JPEG)")
    images, warnings, ignored = [], [], 0
    for label, wnid in enumerate(classes):
        names = []
        for root, _dirs, files in os.walk(folder / wnid, followlinks=True):
            for f in files:
                if f.lower().endswith(IMG_EXTENSIONS):
                    names.append(os.path.relpath(os.path.join(root, f), folder))
                else:
                    ignored += 1
        if not names:
            warnings.append(f"class folder {wnid} holds no image file")
        for rel in sorted(names):
            images.append((rel, label, wnid))
    if not images:
        raise SourceError(f"{folder}: no image files ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} class folder(s)")
    if ignored:
        warnings.append(f"{ignored} file(s) without an image extension ignored")
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


def load_image(path: str | Path, image_size: int, min_side: int) -> tuple[np.ndarray | None, str]:
    """Decode, convert to RGB and crop one image.

    Returns (uint8 array, note) on success, where note names a conversion ("" when none:
    "CMYK->RGB", "L->RGB" for greyscale, "RGBA->RGB", "upscaled 40x30"...), or (None, reason) when the
    image is skipped (unreadable, truncated, smaller than ``min_side`` on its short side).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
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
