"""Faster R-CNN training targets and losses for the BUTD model, computed outside the model.

Conventions are the model's (extractors/butd/ops.py): boxes x1, y1, x2, y2 with inclusive
corners (widths x2 - x1 + 1) in resized-image pixels; `encode_boxes` is the exact inverse of
ops.decode_boxes (whose decoded box spans ctr -/+ w/2), so decode(encode(g, r), r) == g.
RPN: anchors matched by IoU (>= fg_iou positive, < bg_iou negative, and each ground-truth box's
best anchors positive so small objects get one), a sampled minibatch, softmax objectness over
(background, foreground) and smooth-L1 deltas on the positives. ROI head: proposals plus the
ground-truth boxes, sampled fg (IoU >= fg_iou) / bg; cross-entropy over background + classes,
smooth-L1 on the class-specific deltas of the foreground, and attribute cross-entropy on the
foreground, fed the ground-truth class embedding as the original BUTD training does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops import caffe_iou


def encode_boxes(gt: torch.Tensor, ref: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """Regression targets (N, 4) that ops.decode_boxes turns back into `gt` from `ref`."""
    wx, wy, ww, wh = weights
    rw = ref[:, 2] - ref[:, 0] + 1
    rh = ref[:, 3] - ref[:, 1] + 1
    rcx = ref[:, 0] + 0.5 * rw
    rcy = ref[:, 1] + 0.5 * rh
    gw = (gt[:, 2] - gt[:, 0]).clamp(min=1.0)
    gh = (gt[:, 3] - gt[:, 1]).clamp(min=1.0)
    gcx = 0.5 * (gt[:, 0] + gt[:, 2])
    gcy = 0.5 * (gt[:, 1] + gt[:, 3])
    return torch.stack([wx * (gcx - rcx) / rw, wy * (gcy - rcy) / rh,
                        ww * torch.log(gw / rw), wh * torch.log(gh / rh)], dim=1)


def label_anchors(anchors: torch.Tensor, gt: torch.Tensor, fg_iou: float, bg_iou: float):
    """(labels (N,) 1 fg / 0 bg / -1 ignored, index of each anchor's best ground-truth box)."""
    labels = torch.full((len(anchors),), -1, dtype=torch.long)
    if len(gt) == 0:
        labels.zero_()
        return labels, torch.zeros(len(anchors), dtype=torch.long)
    iou = caffe_iou(anchors, gt)
    best_iou, matched = iou.max(dim=1)
    labels[best_iou < bg_iou] = 0
    labels[best_iou >= fg_iou] = 1
    # each box's best anchors (ties included) are positive, matched to that box
    gt_best = iou.max(dim=0).values
    is_best = (iou == gt_best[None, :]) & (gt_best[None, :] > 0)
    rows, cols = is_best.nonzero(as_tuple=True)
    labels[rows] = 1
    matched[rows] = cols
    return labels, matched


def subsample_labels(labels: torch.Tensor, batch: int, fg_fraction: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """At most batch * fg_fraction positives, the rest of `batch` negatives, chosen at random;
    every other entry becomes -1 (ignored)."""
    pos = (labels == 1).nonzero(as_tuple=True)[0]
    neg = (labels == 0).nonzero(as_tuple=True)[0]
    n_pos = min(len(pos), int(batch * fg_fraction))
    n_neg = min(len(neg), batch - n_pos)
    pos = pos[torch.randperm(len(pos), generator=generator)[:n_pos]]
    neg = neg[torch.randperm(len(neg), generator=generator)[:n_neg]]
    out = torch.full_like(labels, -1)
    out[pos] = 1
    out[neg] = 0
    return out


def smooth_l1_sum(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    if pred.numel() == 0:
        return pred.sum()
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum") if beta > 0 else \
        F.l1_loss(pred, target, reduction="sum")


@dataclass(frozen=True)
class RpnSettings:
    batch: int = 128
    fg_fraction: float = 0.5
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    beta: float = 1.0 / 9  # Caffe's smooth-L1 sigma 3


@dataclass(frozen=True)
class RoiSettings:
    batch: int = 32
    fg_fraction: float = 0.5
    fg_iou: float = 0.5
    bg_iou: float = 0.5
    beta: float = 1.0
    attr_weight: float = 0.5


def rpn_losses(objectness_logits: torch.Tensor, anchor_deltas: torch.Tensor, anchors: torch.Tensor,
               gt_boxes: torch.Tensor, settings: RpnSettings,
               generator: torch.Generator | None = None) -> dict:
    """{"rpn_cls": mean softmax CE over the sampled anchors, "rpn_box": smooth-L1 of the positives'
    deltas summed and divided by the number sampled}."""
    labels, matched = label_anchors(anchors, gt_boxes, settings.fg_iou, settings.bg_iou)
    sampled = subsample_labels(labels, settings.batch, settings.fg_fraction, generator)
    valid = sampled >= 0
    n = max(int(valid.sum()), 1)
    cls = F.cross_entropy(objectness_logits[valid], sampled[valid], reduction="sum") / n
    pos = sampled == 1
    targets = encode_boxes(gt_boxes[matched[pos]], anchors[pos]) if pos.any() else anchor_deltas[pos]
    box = smooth_l1_sum(anchor_deltas[pos], targets, settings.beta) / n
    return {"rpn_cls": cls, "rpn_box": box}


@dataclass
class RoiSample:
    boxes: torch.Tensor  # (R, 4) proposals and ground truth, sampled
    labels: torch.Tensor  # (R,) 0 background, 1..C
    targets: torch.Tensor  # (R, 4) regression targets (meaningful for the foreground)
    attrs: torch.Tensor  # (R,) 0 none, 1..A


def sample_rois(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
                gt_attrs: torch.Tensor, settings: RoiSettings, box_weights,
                generator: torch.Generator | None = None) -> RoiSample:
    """Foreground first, then background, as Fast R-CNN samples them (ground truth joins the pool)."""
    boxes = torch.cat([proposals, gt_boxes]) if len(gt_boxes) else proposals
    if len(gt_boxes):
        best_iou, best = caffe_iou(boxes, gt_boxes).max(dim=1)
    else:
        best_iou = torch.zeros(len(boxes))
        best = torch.zeros(len(boxes), dtype=torch.long)
    labels = torch.where(best_iou >= settings.fg_iou, 1, torch.where(best_iou < settings.bg_iou, 0, -1))
    keep_labels = subsample_labels(labels, settings.batch, settings.fg_fraction, generator)
    fg = (keep_labels == 1).nonzero(as_tuple=True)[0]
    bg = (keep_labels == 0).nonzero(as_tuple=True)[0]
    keep = torch.cat([fg, bg])
    out_labels = torch.zeros(len(keep), dtype=torch.long)
    out_attrs = torch.zeros(len(keep), dtype=torch.long)
    targets = torch.zeros(len(keep), 4)
    if len(fg):
        out_labels[:len(fg)] = gt_labels[best[fg]]
        out_attrs[:len(fg)] = gt_attrs[best[fg]]
        targets[:len(fg)] = encode_boxes(gt_boxes[best[fg]], boxes[fg], box_weights)
    return RoiSample(boxes[keep], out_labels, targets, out_attrs)


def attr_logits_for_labels(predictor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The attribute head fed the given class labels' embedding (training), not the predicted argmax."""
    embed = predictor.cls_embed(labels)
    return predictor.attr_linear2(F.relu(predictor.attr_linear1(torch.cat([features, embed], 1))))


def roi_losses(class_logits: torch.Tensor, box_deltas: torch.Tensor, attr_logits: torch.Tensor | None,
               sample: RoiSample, settings: RoiSettings) -> dict:
    """{"roi_cls": mean CE, "roi_box": class-specific smooth-L1 of the foreground summed / R,
    "roi_attr": mean attribute CE over the foreground (0 without foreground or attribute head)}."""
    n = len(sample.labels)
    cls = F.cross_entropy(class_logits, sample.labels)
    fg = sample.labels > 0
    deltas = box_deltas.view(n, -1, 4)[fg.nonzero(as_tuple=True)[0], sample.labels[fg]]
    box = smooth_l1_sum(deltas, sample.targets[fg], settings.beta) / max(n, 1)
    if attr_logits is not None and fg.any():
        attr = F.cross_entropy(attr_logits[fg], sample.attrs[fg])
    else:
        attr = class_logits.sum() * 0
    return {"roi_cls": cls, "roi_box": box, "roi_attr": attr}
