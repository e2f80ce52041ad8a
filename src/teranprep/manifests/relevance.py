"""relevance/: caption x image relevance matrices of one splits/ directory, and the original's files.

Layout (a folder beside splits/, never inside it: splits/ belongs to build-splits):
    relevance/manifest.json              format teranprep.relevance, lineage to splits/manifest.json,
                                         one entry per finished matrix (file, shape, sha256)
    relevance/{split}-{measure}.npy      headerless float32, C order, captions x images: the
                                         layout of mesnico/TERAN's `{dataset}-{split}-{measure}.npy`
    relevance/{split}-{measure}.parts/   while it is being computed: plan.json + row blocks
                                         rows-SSSSSSSS-EEEEEEEE.npy (standard .npy), each written
                                         atomically, so an interrupted run resumes at the first gap
Rows follow SPLIT.parquet's rows, columns the split's images in order of first appearance.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import PrepError
from .atomic import atomic_write_json

RELEVANCE_FORMAT = "teranprep.relevance"
RELEVANCE_FORMAT_VERSION = 1
RELEVANCE_MANIFEST = "manifest.json"
PARTS_SUFFIX = ".parts"
PLAN_NAME = "plan.json"
MEASURES = ("rougeL", "spice")
_ORIGINAL_NAME = re.compile(r"-(rougeL|spice)\.npy$")


def default_relevance_dir(splits_dir: Path) -> Path:
    """`splits-relevance/` beside `splits/`."""
    splits_dir = Path(splits_dir)
    return splits_dir.resolve().parent / f"{splits_dir.resolve().name}-relevance"


def matrix_path(relevance_dir: Path, split: str, measure: str) -> Path:
    return Path(relevance_dir) / f"{split}-{measure}.npy"


def parts_dir(relevance_dir: Path, split: str, measure: str) -> Path:
    return Path(relevance_dir) / f"{split}-{measure}{PARTS_SUFFIX}"


def block_name(start: int, stop: int) -> str:
    return f"rows-{start:08d}-{stop:08d}.npy"


def read_relevance_manifest(relevance_dir: Path) -> dict | None:
    """The folder's manifest, None when there is none yet; refuses another stage's folder."""
    from .ownership import read_stamped_json
    return read_stamped_json(
        Path(relevance_dir) / RELEVANCE_MANIFEST, RELEVANCE_FORMAT, what="relevance manifest",
        missing=None, unreadable=f"delete {relevance_dir} to recompute it",
        foreign="belongs to another stage", foreign_hint="pass --relevance-cache a folder of its own")


def write_relevance_manifest(relevance_dir: Path, manifest: dict) -> None:
    atomic_write_json(Path(relevance_dir) / RELEVANCE_MANIFEST,
                      {**manifest, "format": RELEVANCE_FORMAT, "format_version": RELEVANCE_FORMAT_VERSION})


def measure_of_file(path: Path) -> str:
    """'rougeL' or 'spice' from an original relevance file's name ({dataset}-{split}-{measure}.npy)."""
    match = _ORIGINAL_NAME.search(Path(path).name)
    if not match:
        raise PrepError(f"{path}: a relevance file is named {{dataset}}-{{split}}-{{rougeL|spice}}.npy "
                        "(as mesnico/TERAN's compute_relevance.py writes it); rename it so the "
                        "measure is known")
    return match.group(1)


def open_matrix(path: Path, n_captions: int, n_images: int) -> np.memmap:
    """A headerless float32 captions x images file, read-only, after checking its size."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: no such relevance file")
    size = path.stat().st_size
    want = 4 * n_captions * n_images
    if size != want:
        found = f"{size / (4 * n_images):.1f} x {n_images}" if n_images else str(size)
        raise PrepError(f"{path}: {size} bytes, but the split has {n_captions} captions x {n_images} "
                        f"images = {want} bytes of float32 (the file holds {found}); pass the "
                        "relevance file of this split")
    if want == 0:
        return np.zeros((n_captions, n_images), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_captions, n_images))
