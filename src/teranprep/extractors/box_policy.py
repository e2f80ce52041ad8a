"""Which detected regions are kept: select_top (torchvision backends) and the Caffe tool's BUTD policy."""

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


# ---------------------------------------------------------------- the Caffe (BUTD) tool's policy

def per_class_nms_max_conf(boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float = 0.3) -> torch.Tensor:
    """Each box's highest class score among the classes whose NMS kept it (0 when none did).

    boxes (N, 4) shared by every class, scores (N, C) of the foreground classes. Equals running
    Caffe NMS (+1 widths, suppression at IoU >= nms_thresh) once per class and raising max_conf
    with a strict >, but in one batched call: the IoU matrix is computed once (all classes share
    the boxes) and the greedy pass advances every class's score order together, one rank a step.

    A box still alive at its turn overlaps no earlier KEPT box (IoU is symmetric, or it would
    have been suppressed), so it may OR its whole overlap row into the suppressed set: only later
    or already-suppressed boxes change. Rows are bit-packed (64 boxes per int64 word), so a step
    costs C x ceil(N / 64) word operations.
    """
    from .butd.ops import caffe_iou
    n, c = scores.shape
    if n == 0 or c == 0:
        return scores.new_zeros(n)
    dev = scores.device
    overlaps = caffe_iou(boxes, boxes) >= nms_thresh
    overlaps.fill_diagonal_(False)
    words = (n + 63) // 64
    bit = torch.ones(64, dtype=torch.int64, device=dev) << torch.arange(64, device=dev)
    padded = torch.zeros(n, words * 64, dtype=torch.int64, device=dev)
    padded[:, :n] = overlaps.to(torch.int64)
    packed = (padded.view(n, words, 64) * bit).sum(-1)  # wraps into the sign bit as intended
    by_class = scores.t()
    order = torch.sort(by_class, dim=1, descending=True, stable=True).indices  # (C, N)
    suppressed = torch.zeros(c, words, dtype=torch.int64, device=dev)
    word_of, bit_of = (order // 64).t().contiguous(), (order % 64).t().contiguous()
    order_t = order.t().contiguous()
    # gather / index_select: advanced indexing costs milliseconds per call on CPU here
    for r in range(n):
        state = suppressed.gather(1, word_of[r].unsqueeze(1)).squeeze(1)
        alive = ((state >> bit_of[r]) & 1) == 0
        suppressed |= packed.index_select(0, order_t[r]) * alive.unsqueeze(1)
    idx = torch.arange(n, device=dev)
    is_suppressed = ((suppressed.index_select(1, idx // 64) >> (idx % 64)) & 1).bool()  # (C, N)
    kept_scores = torch.where(is_suppressed, torch.zeros_like(by_class), by_class)
    return kept_scores.max(dim=0).values.clamp(min=0)


def select_caffe(max_conf: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """The Caffe tool's rule: indices with max_conf >= conf_thresh, in proposal order; fewer than
    min_boxes -> the top min_boxes by max_conf; more than max_boxes -> the top max_boxes.

    Only the clamped cases are sorted (descending; exact ties by index), so with min = max = K and
    exactly K passing boxes they stay in proposal order, as in the original tool.
    """
    passing = torch.nonzero(max_conf >= conf_thresh).flatten()
    if len(passing) < min_boxes:
        return torch.sort(max_conf, descending=True, stable=True).indices[:min_boxes]
    if len(passing) > max_boxes:
        return torch.sort(max_conf, descending=True, stable=True).indices[:max_boxes]
    return passing
