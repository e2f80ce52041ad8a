"""Region detectors behind one interface (base.Detector), built in workers from a DetectorSpec."""

from __future__ import annotations

from dataclasses import replace

from ..devices import resolve_device
from .base import PRECISIONS, Detections, Detector, DetectorSpec


def _torchvision(spec):
    from .torchvision_frcnn import TorchvisionFasterRCNN
    return TorchvisionFasterRCNN(spec)


def _butd(spec):
    from .butd.detector import ButdDetector
    return ButdDetector(spec)


def _vinvl(spec):
    from .vinvl.detector import VinvlDetector
    return VinvlDetector(spec)


def _detectron2(spec):
    from .detectron2_backend import Detectron2Detector
    return Detectron2Detector(spec)


# model name -> builder(spec) -> Detector. Backends register here; heavy imports stay lazy.
MODELS = {
    "tv-frcnn-r50-fpn": _torchvision,
    "tv-frcnn-mbv3-320": _torchvision,
    "butd-r101": _butd,
    "butd-tiny": _butd,
    "vinvl-x152c4": _vinvl,
    "vinvl-tiny": _vinvl,
    "detectron2": _detectron2,
}
DEFAULT_MODEL = "butd-r101"
DEFAULT_MIN_BOXES, DEFAULT_MAX_BOXES = 10, 100
# docs/ARCHITECTURE.md "Precision" and benchmarks/README.md give the figures behind this choice
DEFAULT_PRECISION = "fp32"


def resolve_model(model: str, weights, random_weights, min_boxes=None, max_boxes=None):
    """A registry name (butd-vg-r101-k36, ...) -> (architecture, cached weights path, its box
    policy); an architecture name passes through. None boxes mean the default policy."""
    from .registry import WEIGHTS, resolve_weights
    entry = WEIGHTS.get(model)
    if entry is None:
        return (model, weights, DEFAULT_MIN_BOXES if min_boxes is None else min_boxes,
                DEFAULT_MAX_BOXES if max_boxes is None else max_boxes)
    from ..errors import PrepError
    if random_weights is not None:
        raise PrepError(f"--model {model} names published weights; drop --random-weights, or use "
                        f"--model {entry.architecture} --random-weights SEED")
    path = weights if weights is not None else str(resolve_weights(model))
    return (entry.architecture, path, entry.min_boxes if min_boxes is None else min_boxes,
            entry.max_boxes if max_boxes is None else max_boxes)

_CACHE: dict = {}


def _cache_key(spec: DetectorSpec) -> tuple:
    """Everything that changes a built detector's numbers: the spec, the weights file's identity
    (a path rewritten in place, e.g. by train-detector, is another detector) and torch's thread
    count at build time (random weights are calibrated by a forward pass, whose rounding depends
    on it)."""
    import os

    import torch
    weights = None
    if spec.weights:
        try:
            st = os.stat(spec.weights)
            weights = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            weights = "unreadable"  # the builder reports it
    return (spec, weights, torch.get_num_threads())


def build_detector(spec: DetectorSpec) -> Detector:
    """Builds (once per process, per _cache_key) the detector `spec` describes."""
    key = _cache_key(spec)
    detector = _CACHE.get(key)
    if detector is None:
        from ..errors import PrepError
        if spec.model not in MODELS:
            raise PrepError(f"unknown model {spec.model!r}; choose one of: {', '.join(sorted(MODELS))}")
        _CACHE.clear()  # one model resident per worker
        resolved = replace(spec, device=resolve_device(spec.device))
        detector = _CACHE[key] = MODELS[spec.model](resolved)
    return detector


__all__ = ["Detections", "Detector", "DetectorSpec", "MODELS", "DEFAULT_MODEL", "DEFAULT_PRECISION", "PRECISIONS", "build_detector", "resolve_model"]
