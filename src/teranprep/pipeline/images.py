"""Finding images under a root and decoding them safely to RGB uint8 (EXIF-oriented, cv2 semantics).

Decoding is done by Pillow inside the worker process: it raises on corrupt data instead of
crashing (unlike some native decoders), and every failure becomes an ItemError with its reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import ItemError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Pillow's default bomb limit (~89 Mpx) warns at 1x and raises at 2x; we refuse at 1x.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class ImageEntry:
    key: str  # path relative to the root, POSIX separators (inputs.py: other input kinds)
    size: int
    mtime_ns: int
    extra: tuple = ()  # (name, value) pairs: where to read it (tar, member), caption, metadata

    def extra_dict(self) -> dict:
        return dict(self.extra)


def discover_images(root: Path, limit: int | None = None) -> list[ImageEntry]:
    """Every image file under `root` (recursive, case-insensitive extensions), sorted by key."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                st = None
            key = path.relative_to(root).as_posix()
            found.append(ImageEntry(key, st.st_size if st else -1, st.st_mtime_ns if st else -1))
    found.sort(key=lambda e: e.key)
    return found[:limit] if limit is not None else found


def listing_sha256(entries: list[ImageEntry]) -> str:
    digest = hashlib.sha256()
    for e in entries:
        digest.update(f"{e.key}\t{e.size}\n".encode("utf-8"))
    return digest.hexdigest()


def _to_rgb8(img: Image.Image) -> Image.Image:
    """RGB 8-bit the way OpenCV's imread(IMREAD_COLOR) gives it: alpha dropped, 16-bit >> 8."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.uint32)
        arr = (arr >> 8) if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else arr
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes) -> np.ndarray:
    """RGB uint8 (H, W, 3) from encoded bytes; raises ItemError naming the reason."""
    if not data:
        raise ItemError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ItemError(f"decompression bomb: {width}x{height} pixels exceeds the limit "
                                f"of {MAX_IMAGE_PIXELS}")
            if fmt == "PNG":
                probe.verify()  # checks chunk CRCs, which decoding alone may not
            img = Image.open(io.BytesIO(data)) if fmt == "PNG" else probe
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(_to_rgb8(img))
    except ItemError:
        raise
    except Image.DecompressionBombError as exc:
        raise ItemError(f"decompression bomb: {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ItemError(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ItemError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError,
            ZeroDivisionError) as exc:  # Pillow's corrupt-data errors are this assorted
        raise ItemError(f"corrupt image data: {type(exc).__name__}: {exc}") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ItemError(f"decoded to an unusable array of shape {rgb.shape}")
    return np.array(rgb, dtype=np.uint8, order="C")  # writable copy, detached from Pillow


def read_image(path: Path) -> tuple[np.ndarray, bytes]:
    """(RGB array, raw bytes) of a file; raises ItemError when it cannot be read or decoded."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ItemError(f"unreadable file: {exc.strerror or exc}") from None
    return decode_image(data), data
