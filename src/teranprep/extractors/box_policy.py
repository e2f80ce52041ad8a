"""Which detected regions are kept: confidence threshold, then a [min_boxes, max_boxes] clamp."""

from __future__ import annotations

import torch


def select_top(scores: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """Indices of `scores` kept by `score >= conf_thresh` clamped to [min_boxes, max_boxes], best first.

    Ties keep their input order (stable sort), so the result does not depend on the sort kernel.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    n_pass = int((scores >= conf_thresh).sum())
    n_keep = min(max(n_pass, min_boxes), max_boxes, scores.numel())
    return order[:n_keep]
