"""Detection accuracy: VOC-style average precision per class at one IoU threshold, and their mean.

Matching follows the PASCAL VOC devkit: detections of a class are visited by descending score; a
detection is a true positive when its best-overlapping ground-truth box of that class (in the
same image) has IoU >= the threshold and was not matched before; otherwise a false positive.
AP is the area under the precision-recall curve with precision made monotone (the maximum
precision at any higher recall), summed over the recall steps ("all points", VOC 2010 on).
Boxes are x1, y1, x2, y2 with exclusive right/bottom edges (x2 = x + w for a COCO box).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou


@dataclass
class ImageDetections:
    boxes: np.ndarray  # (n, 4)
    scores: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) class index
    attrs: np.ndarray | None = None  # (n,) predicted attribute index, optional


@dataclass
class ImageTruth:
    boxes: np.ndarray  # (m, 4)
    labels: np.ndarray  # (m,)
    attrs: np.ndarray | None = None  # (m,)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the monotone-precision envelope of a PR curve (points in detection order)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)).numpy()


def class_average_precision(detections: list[ImageDetections], truths: list[ImageTruth], label: int,
                            iou_threshold: float = 0.5) -> tuple[float | None, dict]:
    """AP of one class over a set of images (None when the class has no ground truth), plus the
    matching details: per-detection (image, index, true positive?, matched truth index)."""
    gt = [t.boxes[t.labels == label] for t in truths]
    gt_index = [np.nonzero(t.labels == label)[0] for t in truths]
    n_gt = sum(len(g) for g in gt)
    found = [(float(d.scores[k]), i, int(k)) for i, d in enumerate(detections)
             for k in np.nonzero(d.labels == label)[0]]
    # by descending score; ties keep image order, as a stable sort of the devkit's list does
    found.sort(key=lambda item: -item[0])
    used = [np.zeros(len(g), bool) for g in gt]
    tp = np.zeros(len(found))
    matches = []
    for j, (_, i, k) in enumerate(found):
        match = -1
        if len(gt[i]):
            overlaps = _iou(detections[i].boxes[k:k + 1], gt[i])[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] >= iou_threshold and not used[i][best]:
                used[i][best] = True
                tp[j] = 1
                match = int(gt_index[i][best])
        matches.append((i, k, bool(tp[j]), match))
    if n_gt == 0:
        return None, {"matches": matches, "n_gt": 0}
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return average_precision(recall, precision), {"matches": matches, "n_gt": n_gt}


def mean_average_precision(detections: list[ImageDetections], truths: list[ImageTruth],
                           labels: list[int], iou_threshold: float = 0.5) -> dict:
    """{"map": mean AP over the classes that have ground truth, "per_class": {label: AP},
    "attr_accuracy": share of true-positive detections whose attribute matches, when given}."""
    per_class, correct, total = {}, 0, 0
    for label in labels:
        ap, info = class_average_precision(detections, truths, label, iou_threshold)
        if ap is None:
            continue
        per_class[label] = ap
        for i, k, is_tp, match in info["matches"]:
            if is_tp and detections[i].attrs is not None and truths[i].attrs is not None:
                total += 1
                correct += int(detections[i].attrs[k] == truths[i].attrs[match])
    return {"map": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "per_class": per_class, "attr_accuracy": correct / total if total else None}
