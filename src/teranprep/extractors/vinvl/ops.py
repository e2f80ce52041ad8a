"""maskrcnn_benchmark's conventions where VinVL differs from BUTD: PIL resize, x2 = ctr + w/2 - 1
box decoding, and the test-time selection of scene_graph_benchmark's PostProcessor /
AttributePostProcessor.

NMS: maskrcnn_benchmark.layers.nms is torchvision.ops.nms whenever torchvision imports (its own
compiled nms_cpu is only the fallback), so the reference suppresses at IoU > thr with widths
x2 - x1 (no +1) and returns the kept boxes best first; BUTD's Caffe NMS differs on all three."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from torchvision.ops import nms


def resized_size(height: int, width: int, short: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """maskrcnn_benchmark's Resize.get_size: (out_h, out_w). The short side goes to `short`
    unless the long side would exceed `max_size` (then short = round(max * lo / hi)); the long
    side is truncated (int()), not rounded."""
    size = short
    lo, hi = float(min(width, height)), float(max(width, height))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def preprocess(image_rgb: np.ndarray, pixel_mean_bgr, short: int, max_size: int) -> torch.Tensor:
    """RGB uint8 HxWx3 -> (1, 3, H', W') float32, as build_transforms(is_train=False) computes it:
    PIL bilinear resize of the uint8 image, to_tensor (/255), BGR x 255, minus the mean."""
    h, w = image_rgb.shape[:2]
    out_h, out_w = resized_size(h, w, short, max_size)
    pil = Image.fromarray(np.ascontiguousarray(image_rgb))
    if (out_h, out_w) != (h, w):
        pil = pil.resize((out_w, out_h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    x = x[[2, 1, 0]] * 255  # the same two roundings as the reference's to_tensor + to_bgr255
    x = x - torch.tensor(pixel_mean_bgr, dtype=torch.float32).view(3, 1, 1)
    return x.unsqueeze(0).contiguous()


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = float(np.log(1000.0 / 16))) -> torch.Tensor:
    """maskrcnn_benchmark's BoxCoder.decode: widths x2 - x1 + 1, centre x1 + w/2, and x2 =
    ctr + w/2 - 1 (BUTD's Caffe decoding has no -1). deltas (N, 4), boxes (N, 4) -> (N, 4)."""
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw = torch.clamp(deltas[:, 2] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3] / wh, max=scale_clamp)
    pcx = dx * widths + ctr_x
    pcy = dy * heights + ctr_y
    pw = torch.exp(dw) * widths
    ph = torch.exp(dh) * heights
    return torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw - 1, pcy + 0.5 * ph - 1], dim=1)


def _per_class_nms(boxes, probs, thresh, nms_thresh):
    """filter_results' loop: for each foreground class j (ascending), the proposals scoring
    > thresh, NMS among them, kept best first. -> (proposal idx, label, score)."""
    idx, labels, scores = [], [], []
    passing = probs > thresh
    passing[:, 0] = False
    for j in torch.nonzero(passing.any(dim=0)).flatten().tolist():
        inds = torch.nonzero(passing[:, j]).flatten()
        kept = inds[nms(boxes[inds], probs[inds, j], nms_thresh)]  # best first
        idx.append(kept)
        labels.append(torch.full_like(kept, j))
        scores.append(probs[kept, j])
    if not idx:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, probs.new_zeros(0)
    return torch.cat(idx), torch.cat(labels), torch.cat(scores)


def select_detections(boxes: torch.Tensor, probs: torch.Tensor, score_thresh: float, nms_thresh: float,
                      min_detections: int, max_detections: int, halvings: int = 10):
    """scene_graph_benchmark's PostProcessor.filter_results (NMS_FILTER 0) with its retry loop.

    boxes (P, 4) proposals (IGNORE_BOX_REGRESSION: every class shares them), probs (P, C)
    softmax. A proposal may be kept for several classes. More than `max_detections`: those
    scoring >= the (n - max + 1)-th smallest score, in their order (ties may keep more). Fewer
    than `min_detections`: the threshold is halved and the filter rerun, at most `halvings`
    times. -> (proposal indices, labels 1..C-1, scores), class-major order."""
    thresh = score_thresh
    idx, labels, scores = _per_class_nms(boxes, probs, thresh, nms_thresh)
    tries = 0
    while len(idx) < min_detections and tries < halvings:
        thresh /= 2.0
        idx, labels, scores = _per_class_nms(boxes, probs, thresh, nms_thresh)
        tries += 1
    n = len(idx)
    if n > max_detections > 0:
        image_thresh = torch.kthvalue(scores.cpu(), n - max_detections + 1).values.item()
        keep = torch.nonzero(scores >= image_thresh).flatten()
        idx, labels, scores = idx[keep], labels[keep], scores[keep]
    return idx, labels, scores


def select_attributes(attr_logits: torch.Tensor, thresh: float, per_image: int, per_box: int):
    """AttributePostProcessor.filter_results: softmax, column 0 (no attribute) set to 0, scores
    <= thresh set to 0, the per-image cap as the reference computes it (kthvalue over every
    entry, zeros included), then the top `per_box` per box. -> (labels, scores), (R, per_box);
    labels whose score is 0 are arbitrary (ties among zeros)."""
    scores = torch.softmax(attr_logits.float(), dim=-1)
    scores[:, 0] = 0.0
    passing = scores > thresh
    n = int(passing.sum())
    scores[~passing] = 0.0
    if n > per_image > 0:
        cut = torch.kthvalue(scores.flatten().cpu(), n - per_image + 1).values.item()
        scores[scores < cut] = 0.0
    k = min(per_box, scores.shape[1])
    top = torch.topk(scores, k, dim=1)
    return top.indices, top.values


def scale_to_original(boxes: torch.Tensor, input_hw, original_hw) -> torch.Tensor:
    """BoxList.resize((W, H)) from the input size: one ratio when both agree, else x and y apart
    (Python-float ratios, as the reference)."""
    (h_in, w_in), (h, w) = input_hw, original_hw
    rw, rh = float(w) / float(w_in), float(h) / float(h_in)
    if rw == rh:
        return boxes * rw
    return torch.stack([boxes[:, 0] * rw, boxes[:, 1] * rh, boxes[:, 2] * rw, boxes[:, 3] * rh], dim=1)


def select_detections_max_class(probs: torch.Tensor, boxes: torch.Tensor, score_thresh: float,
                                min_detections: int, max_detections: int, nms_thresh: float = 0.3):
    """PostProcessor.filter_results_peter (MODEL.ROI_HEADS.NMS_FILTER 1, what scene_graph_benchmark's
    README passes when it extracts VinVL features for Oscar): NMS at 0.3 for every foreground class
    over all proposals, each proposal's best class among those that kept it, proposals with none
    dropped; then best first, those >= score_thresh clamped to [min_detections, max_detections].
    One row per proposal. -> (proposal indices, labels 1..C-1, scores)."""
    n, c = probs.shape
    kept_scores = torch.zeros_like(probs)
    for j in range(1, c):
        keep = nms(boxes, probs[:, j], nms_thresh)
        kept_scores[keep, j] = probs[keep, j]
    scores, labels = kept_scores.max(dim=1)
    idx = torch.nonzero(scores).flatten()
    scores, labels = scores[idx], labels[idx]
    order = torch.sort(scores, descending=True, stable=True).indices
    n_pass = int((scores >= score_thresh).sum())
    take = order[:min(max(n_pass, min_detections), max_detections)]
    return idx[take], labels[take], scores[take]
