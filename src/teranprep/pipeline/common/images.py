"""Finding images under a root and decoding them safely to RGB uint8 (EXIF-oriented, cv2 semantics).

Decoding is done by Pillow inside the worker process: it raises on corrupt data instead of
crashing (unlike some native decoders), and every failure becomes an ItemError with its reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ...errors import ItemError

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


@dataclass
class PassedOver:
    """What discovery did not list, by reason, with a few example paths each (for the manifest)."""

    counts: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)

    def add(self, reason: str, path: str, keep: int = 5) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < keep:
            shown.append(path)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {reason: {"count": n, "examples": self.examples.get(reason, [])}
                for reason, n in sorted(self.counts.items())}

    def summary(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))


UNSUPPORTED = "unsupported extension"
HIDDEN = "hidden"
INTO_TREE = "symlink into the tree"


def discover_images(root: Path, limit: int | None = None) -> list[ImageEntry]:
    """Every image file under `root` (recursive, case-insensitive extensions), sorted by key."""
    return discover_images_with_report(root, limit)[0]


def discover_images_with_report(root: Path, limit: int | None = None) -> tuple[list[ImageEntry], PassedOver]:
    """(image entries sorted by key, what was passed over and why).

    Hidden files and folders, files with other extensions, and symlinks that lead back into the
    tree (a directory cycle, or a second name for a file already listed) are passed over and
    counted; every real directory is walked once. Symlinks out of the tree are followed.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    found, passed = [], PassedOver()
    seen_dirs = set()

    def inside_tree(path: str) -> bool:
        real = os.path.realpath(path)
        return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)

    def walk(directory: Path):
        try:
            st = os.stat(directory)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen_dirs:  # a cycle through links from outside the tree
            passed.add(INTO_TREE, directory.relative_to(root).as_posix())
            return
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            children = sorted(os.scandir(directory), key=lambda d: d.name)
        except OSError:
            return
        for child in children:
            rel = (directory / child.name).relative_to(root).as_posix()
            if child.name.startswith("."):
                passed.add(HIDDEN, rel)
                continue
            is_link = child.is_symlink()
            try:
                is_dir = child.is_dir()  # follows links
            except OSError:
                is_dir = False
            if is_dir:
                if is_link and inside_tree(child.path):
                    passed.add(INTO_TREE, rel)
                    continue
                walk(directory / child.name)
                continue
            if not child.name.lower().endswith(IMAGE_EXTENSIONS):
                passed.add(UNSUPPORTED, rel)
                continue
            if is_link and os.path.exists(child.path) and inside_tree(child.path):
                passed.add(INTO_TREE, rel)
                continue
            try:
                fst = os.stat(child.path)
            except OSError:
                fst = None  # a dangling link: listed, and becomes an "unreadable" error row
            found.append(ImageEntry(rel, fst.st_size if fst else -1, fst.st_mtime_ns if fst else -1))

    walk(root)
    found.sort(key=lambda e: e.key)
    return (found[:limit] if limit is not None else found), passed


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


def too_large_message(size: str, max_pixels: int) -> str:
    return (f"image too large ({size}, limit {max_pixels / 1e6:.0f} megapixels; "
            "--max-megapixels to raise)")


def _too_large(exc: Exception, max_pixels: int) -> str:
    """Pillow's size refusal (raised while opening, before the size is known to us) in our words."""
    import re
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "size unknown"
    return too_large_message(size, max_pixels)


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """RGB uint8 (H, W, 3) from encoded bytes; raises ItemError naming the reason. An image of
    more than `max_pixels` (read from its header, before any pixel is decoded) is refused."""
    if not data:
        raise ItemError("empty file (0 bytes)")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # our check on the header replaces Pillow's (which would refuse a raised
            # --max-megapixels first, and without naming the size)
            Image.MAX_IMAGE_PIXELS = None
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
            width, height = probe.size
            if width * height > max_pixels:
                raise ItemError(too_large_message(f"{width} x {height}", max_pixels))
            if fmt == "PNG":
                probe.verify()  # checks chunk CRCs, which decoding alone may not
            img = Image.open(io.BytesIO(data)) if fmt == "PNG" else probe
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = np.asarray(_to_rgb8(img))
    except ItemError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(_too_large(exc, max_pixels)) from None
    except Image.UnidentifiedImageError:
        raise ItemError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError,
            ZeroDivisionError) as exc:  # Pillow's corrupt-data errors are this assorted
        raise ItemError(f"corrupt image data: {type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
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
