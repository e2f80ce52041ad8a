"""The detector interface every backend implements, and the picklable spec workers build it from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Detections:
    """One image's regions as a detector returns them, boxes in original-image pixels."""

    boxes: np.ndarray  # (n, 4) float32 x1 y1 x2 y2
    features: np.ndarray  # (n, D) float32
    class_ids: np.ndarray | None = None  # (n,) int32
    class_scores: np.ndarray | None = None  # (n,) float32
    attr_ids: np.ndarray | None = None
    attr_scores: np.ndarray | None = None


class Detector(Protocol):
    """Images in (RGB uint8 HxWx3 arrays), one Detections per image out."""

    name: str
    feature_dim: int
    weights_sha256: str
    columns: tuple[str, ...]  # which optional Detections fields it fills

    def detect(self, images: list[np.ndarray],
               boxes: list[np.ndarray | None] | None = None) -> list[Detections]:
        """`boxes`, when given, are per-image (k, 4) pixel boxes to pool features for (no detection)."""
        ...


@dataclass(frozen=True)
class DetectorSpec:
    """Everything needed to build a detector inside a worker process; small and picklable.

    `model` names an entry of MODELS (extractors/__init__.py). `weights` is a checkpoint path, or
    None with `random_seed` set for deterministic random weights (meaningless features).
    """

    model: str
    weights: str | None = None
    random_seed: int | None = None
    device: str = "cpu"
    conf_thresh: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    options: tuple = field(default_factory=tuple)  # (key, value) pairs, backend-specific
    precision: str = "fp32"  # fp32 | bf16: the conv trunks' weights and activations (PRECISIONS)

    def option(self, key, default=None):
        return dict(self.options).get(key, default)


PRECISIONS = ("fp32", "bf16")
