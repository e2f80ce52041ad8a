"""Value checks on what a stage reads or writes: finite features, boxes and sizes, finite scores.

A NaN or inf never passes silently: a region set with one is a per-image problem (an error row
with the reason), a score matrix with one is a fatal PrepError (a NaN ranks nothing: every
comparison with it is false, so a NaN model would put the true match first and score R@1 100).
"""

from __future__ import annotations

import numpy as np

from ..errors import PrepError

# Boxes may reach one pixel past the image's far edge: the Caffe/BUTD convention clips to
# [0, W - 1] and adds 1 to widths, and some tools store x2 = W exactly.
INVERTED_TOLERANCE = 1.0  # px; see region_value_problem
BOX_EDGE_TOLERANCE = 1.0
# How many images `prep verify` checks values of without --full (spread over the store).
VERIFY_SAMPLE = 256


def _count_nonfinite(array) -> int:
    array = np.asarray(array)
    if array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def region_value_problem(regions, *, source: str = "the source") -> str | None:
    """None when `regions` (manifests.shards.Regions) holds only usable values, else the reason:
    non-finite features / boxes / scores, a size that is not a positive integer (-1, unknown, is
    allowed), an inverted box (x2 < x1 or y2 < y1, by more than 1 px) or a box outside the image (W x H, after EXIF
    orientation). `source` names where the values came from, for the message."""
    n_bad = _count_nonfinite(regions.features)
    if n_bad:
        return (f"{n_bad} of {np.asarray(regions.features).size} feature values are non-finite "
                f"(NaN/inf) in {source}")
    boxes = np.asarray(regions.boxes, dtype=np.float64).reshape(-1, 4)
    n_bad = _count_nonfinite(boxes)
    if n_bad:
        row = int(np.flatnonzero(~np.isfinite(boxes).all(1))[0])
        return f"{n_bad} box coordinates are non-finite (NaN/inf) in {source}, e.g. box {row}"
    for name in ("class_scores", "attr_scores"):
        values = getattr(regions, name, None)
        if values is not None and _count_nonfinite(values):
            return f"{_count_nonfinite(values)} {name} are non-finite (NaN/inf) in {source}"
    sizes = (regions.width, regions.height)
    for value in sizes:
        if isinstance(value, float) and not np.isfinite(value):
            return f"image size {sizes[0]} x {sizes[1]} is not finite in {source}"
    width, height = (int(v) for v in sizes)
    if (width, height) != (-1, -1) and (width < 1 or height < 1):
        return f"image size {width} x {height} is not a positive size in {source} (-1 x -1 = unknown)"
    # maskrcnn_benchmark's decoding (x2 = centre + w/2 - 1) leaves VinVL boxes narrower than a
    # pixel inverted by up to 1 px, which the released features keep: inverted means beyond that
    inverted = (boxes[:, 2] < boxes[:, 0] - INVERTED_TOLERANCE) | (boxes[:, 3] < boxes[:, 1] - INVERTED_TOLERANCE)
    if inverted.any():
        row = int(np.flatnonzero(inverted)[0])
        return (f"{int(inverted.sum())} boxes are inverted (x2 < x1 or y2 < y1 by more than "
                f"{INVERTED_TOLERANCE:g} px) in {source}, e.g. "
                f"box {row} {_box_text(boxes[row])}")
    if width > 0 and len(boxes):
        t = BOX_EDGE_TOLERANCE
        outside = ((boxes[:, 0] < -t) | (boxes[:, 1] < -t) | (boxes[:, 2] > width + t)
                   | (boxes[:, 3] > height + t))
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            return (f"{int(outside.sum())} boxes lie outside the {width} x {height} image in {source}, "
                    f"e.g. box {row} {_box_text(boxes[row])} (boxes are x1,y1,x2,y2 pixels of the "
                    "image after EXIF orientation)")
    return None


def _box_text(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def require_finite_scores(scores, *, what: str, hint: str) -> None:
    """Raises PrepError when `scores` holds a NaN or inf: one line naming `what` was scored and
    how many values are bad, then `hint` (the likely cause and the check to run)."""
    n_bad = _count_nonfinite(scores)
    if n_bad:
        total = int(np.asarray(scores).size)
        raise PrepError(f"{what}: {n_bad} of {total} scores are non-finite (NaN/inf), so no ranking "
                        f"or recall is meaningful; {hint}")


def tensors_nonfinite(named_tensors) -> list[str]:
    """Names of the floating-point tensors (name, tensor) pairs that hold a NaN or inf."""
    import torch
    return [name for name, t in named_tensors
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]


def sample_positions(n: int, sample: int | None) -> np.ndarray:
    """Positions 0..n-1 to check: all when `sample` is None, else `sample` spread evenly."""
    if sample is None or n <= sample:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, sample).round().astype(np.int64))
