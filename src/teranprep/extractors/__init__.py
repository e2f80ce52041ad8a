"""Region detectors behind one interface (base.Detector), built in workers from a DetectorSpec."""

from __future__ import annotations

from dataclasses import replace

from .base import Detections, Detector, DetectorSpec, resolve_device


def _torchvision(spec):
    from .torchvision_frcnn import TorchvisionFasterRCNN
    return TorchvisionFasterRCNN(spec)


# model name -> builder(spec) -> Detector. Backends register here; heavy imports stay lazy.
MODELS = {
    "tv-frcnn-r50-fpn": _torchvision,
    "tv-frcnn-mbv3-320": _torchvision,
}
DEFAULT_MODEL = "tv-frcnn-r50-fpn"

_CACHE: dict = {}


def build_detector(spec: DetectorSpec) -> Detector:
    """Builds (once per process) the detector `spec` describes."""
    detector = _CACHE.get(spec)
    if detector is None:
        from ..errors import PrepError
        if spec.model not in MODELS:
            raise PrepError(f"unknown model {spec.model!r}; choose one of: {', '.join(sorted(MODELS))}")
        _CACHE.clear()  # one model resident per worker
        resolved = replace(spec, device=resolve_device(spec.device))
        detector = _CACHE[spec] = MODELS[spec.model](resolved)
    return detector


__all__ = ["Detections", "Detector", "DetectorSpec", "MODELS", "DEFAULT_MODEL", "build_detector",
           "resolve_device"]
