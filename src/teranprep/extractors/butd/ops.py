"""Caffe-convention building blocks of BUTD: preprocessing, anchors, +1 box coding, Caffe NMS.

Where torchvision's conventions differ from Caffe's they are not used:
- torchvision.ops.nms suppresses at IoU > thr and counts widths as x2 - x1; Caffe's kernel
  suppresses at IoU >= thr with widths x2 - x1 + 1 (`caffe_nms` below).
- torch's bilinear resize maps pixels by in/out size when given a size, and floors the output
  size when given a scale; cv2 (which the Caffe tool and MILVLG use) rounds the output size and
  maps pixels by the scale itself (`resize_bilinear_by_scale` calls the aten op with both).
- torchvision.ops.roi_pool IS Caffe's ROIPooling (Fast R-CNN): box corners are rounded
  (C `round`, half away from zero) after multiplying by spatial_scale, the end is inclusive
  (width = x2 - x1 + 1, at least 1), bins are floor/ceil of multiples of width / 14, empty bins
  give 0. MILVLG pools with the same op through detectron2's ROIPooler, so it is used as is
  with spatial_scale = 1 / 16; tests/test_butd_ops.py checks it against a direct loop.
"""

from __future__ import annotations

import numpy as np
import torch


def image_scale(height: int, width: int, short: int = 600, max_size: int = 1000) -> float:
    """The single resize factor of the Caffe tool: short side to `short`, unless the long side
    would then round above `max_size`."""
    lo, hi = min(height, width), max(height, width)
    scale = float(short) / float(lo)
    if np.round(scale * hi) > max_size:  # np.round: the tool's rounding (half to even)
        scale = float(max_size) / float(hi)
    return scale


def resize_bilinear_by_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """cv2.resize(x, None, fx=scale, fy=scale, INTER_LINEAR) on an (N, C, H, W) float tensor.

    Output size is round(H * scale) (cv2 rounds); source pixel = (dst + 0.5) / scale - 0.5, with
    the scale itself, not out/in; no antialiasing (cv2 has none for bilinear).
    """
    h, w = x.shape[-2:]
    out_h, out_w = int(round(h * scale)), int(round(w * scale))
    # The aten op accepts the output size AND the scales: the scales then define the mapping.
    # In float64: float32 source coordinates drift by ~1e-4 px at x = 1000, and the result then
    # differs from cv2 by up to 1e-2 on a noisy 0..255 image; in float64 it agrees to 3e-5.
    out = torch.ops.aten.upsample_bilinear2d(x.double(), [out_h, out_w], False, scale, scale)
    return out.to(x.dtype)


def preprocess(image_rgb: np.ndarray, pixel_mean_bgr, short: int, max_size: int):
    """RGB uint8 HxWx3 -> ((1, 3, H', W') float32 BGR mean-subtracted resized tensor, scale)."""
    bgr = torch.from_numpy(np.ascontiguousarray(image_rgb[:, :, ::-1])).float()
    bgr = bgr - torch.tensor(pixel_mean_bgr, dtype=torch.float32)
    x = bgr.permute(2, 0, 1).unsqueeze(0).contiguous()
    scale = image_scale(image_rgb.shape[0], image_rgb.shape[1], short, max_size)
    return resize_bilinear_by_scale(x, scale), scale


def caffe_cell_anchors(base: int = 16, ratios=(0.5, 1.0, 2.0), scales=(4.0, 8.0, 16.0, 32.0)) -> torch.Tensor:
    """Caffe's generate_anchors: (len(ratios) * len(scales), 4), ratio-major, inclusive corners."""
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws, hs, cx, cy):
        ws, hs = np.asarray(ws, float)[:, None], np.asarray(hs, float)[:, None]
        return np.hstack([cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)])

    w, h, cx, cy = whctrs(np.array([0, 0, base - 1, base - 1], float))
    size_ratios = (w * h) / np.asarray(ratios, float)
    ws = np.round(np.sqrt(size_ratios))
    ratio_anchors = mk(ws, np.round(ws * np.asarray(ratios, float)), cx, cy)
    out = []
    for a in ratio_anchors:
        w, h, cx, cy = whctrs(a)
        out.append(mk(w * np.asarray(scales, float), h * np.asarray(scales, float), cx, cy))
    return torch.from_numpy(np.vstack(out)).float()


def grid_anchors(cell_anchors: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors of an HxW feature map in (H, W, A) order: (H * W * A, 4)."""
    dev = cell_anchors.device
    sy, sx = torch.meshgrid(torch.arange(height, device=dev, dtype=torch.float32) * stride,
                            torch.arange(width, device=dev, dtype=torch.float32) * stride, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(deltas: torch.Tensor, boxes: torch.Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = float(np.log(1000.0 / 16))) -> torch.Tensor:
    """Caffe/MILVLG box decoding: widths x2 - x1 + 1, centre x1 + w/2, x2 = ctr + w/2 (no -1).

    deltas (N, 4k), boxes (N, 4) -> (N, 4k).
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pcx = dx * widths[:, None] + ctr_x[:, None]
    pcy = dy * heights[:, None] + ctr_y[:, None]
    pw = torch.exp(dw) * widths[:, None]
    ph = torch.exp(dh) * heights[:, None]
    out = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """Clip to [0, width - 1] x [0, height - 1] (the Caffe tool's inclusive pixel grid)."""
    return torch.stack([boxes[:, 0].clamp(0, width - 1), boxes[:, 1].clamp(0, height - 1),
                        boxes[:, 2].clamp(0, width - 1), boxes[:, 3].clamp(0, height - 1)], dim=1)


def caffe_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) IoU with +1 widths, computed in the same operation order as Caffe's kernel
    (inter / (area_i + area_j - inter)); symmetric, so one matrix serves every score order."""
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    xx1 = torch.maximum(a[:, None, 0], b[None, :, 0])
    yy1 = torch.maximum(a[:, None, 1], b[None, :, 1])
    xx2 = torch.minimum(a[:, None, 2], b[None, :, 2])
    yy2 = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = (xx2 - xx1 + 1).clamp(min=0) * (yy2 - yy1 + 1).clamp(min=0)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Descending score order. Caffe's kernel uses an unstable sort, whose order among exactly
    equal scores is unspecified; we break exact ties by index (stable) so runs are reproducible."""
    return torch.sort(scores, descending=True, stable=True).indices


def caffe_nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float,
              max_keep: int | None = None) -> torch.Tensor:
    """Caffe NMS: +1 widths, suppress at IoU >= threshold; kept indices in ascending index order.

    One vectorised IoU row per kept box (never an N x N matrix). With `max_keep`, stops after that
    many keeps: the same as truncating the full result when boxes arrive sorted by score.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = descending_order(scores)
    b = boxes[order]
    x1, y1, x2, y2 = b.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    kept = []
    pos = 0
    while pos < n:
        i = pos
        kept.append(i)
        if max_keep is not None and len(kept) >= max_keep:
            break
        rest = slice(i + 1, n)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        suppressed[rest] |= inter / (areas[i] + areas[rest] - inter) >= threshold
        alive = (~suppressed[i + 1:]).nonzero()
        if alive.numel() == 0:
            break
        pos = i + 1 + int(alive[0])
    return torch.sort(order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]).values


def roi_pool_bins(boxes: torch.Tensor, height: int, width: int, output: int, spatial_scale: float):
    """Caffe ROIPooling's bins, computed as its kernel (and torchvision's) computes them: corners
    times spatial_scale in float32, C round (half away from zero), inclusive end, at least 1
    cell; bin size = extent / output in float32; bin p covers [floor(p * size), ceil((p + 1) *
    size)) + start, clamped to the map. -> (y0, y1, x0, x1), each (R, output) int64."""
    b = boxes.float() * torch.tensor(spatial_scale, dtype=torch.float32)
    corners = torch.floor(b.double().abs() + 0.5).copysign(b.double()).long()  # C round()
    x1, y1, x2, y2 = corners.unbind(1)
    p = torch.arange(output, dtype=torch.float32, device=boxes.device)

    def bins(start, end, limit):
        size = (end - start + 1).clamp(min=1).float() / float(output)  # float32, as the kernel
        lo = torch.floor(p[None] * size[:, None]).long() + start[:, None]
        hi = torch.ceil((p[None] + 1) * size[:, None]).long() + start[:, None]
        return lo.clamp(0, limit), hi.clamp(0, limit)

    y0, y1b = bins(y1, y2, height)
    x0, x1b = bins(x1, x2, width)
    return y0, y1b, x0, x1b


def roi_max_pool(feature: torch.Tensor, boxes: torch.Tensor, output: int, spatial_scale: float,
                 nonnegative: bool | None = None) -> torch.Tensor:
    """Caffe ROIPooling (= torchvision.ops.roi_pool) of one image's (1, C, H, W) map, for
    inference: the same bins and the same maximum, so the same values bit for bit in any dtype
    (a max rounds nothing); computed in the map's own dtype, and returned channels-last
    (R, C, output, output), the layout res5 runs in. Separable: a bin's maximum is the maximum
    over its columns of the per-row maxima, and each ROI reads only its own window of the map,
    where torchvision's CPU kernel walks every bin element by element. Indices are clamped to a
    bin's last cell (a repeated element leaves a maximum unchanged); empty bins are 0.
    A map with no negative value (res4 comes out of a ReLU) is compared as integers of the same
    width: non-negative IEEE floats order as their bit patterns do, and integer maxima are
    several times faster than bf16 ones here. `nonnegative` saves that check when the caller
    pools the same map several times."""
    _, c, h, w = feature.shape
    r = boxes.shape[0]
    as_int = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(feature.dtype)
    if nonnegative is None and as_int is not None and r:
        nonnegative = bool(feature.min() >= 0)  # a NaN fails the test: the float path
    if as_int is not None and r and nonnegative:
        return roi_max_pool(feature.view(as_int), boxes, output, spatial_scale, False).view(feature.dtype)
    hwc = feature[0].permute(1, 2, 0)  # (H, W, C): a contiguous view for a channels-last map
    out = torch.empty((r, output, output, c), dtype=feature.dtype, device=feature.device)
    if r == 0:
        return out.permute(0, 3, 1, 2)
    y0, y1, x0, x1 = roi_pool_bins(boxes, h, w, output, spatial_scale)
    empty = (y1 <= y0)[:, :, None] | (x1 <= x0)[:, None, :]  # (R, output, output)
    rows_k = int((y1 - y0).max().clamp(min=1))
    cols_k = int((x1 - x0).max().clamp(min=1))
    span = torch.arange(max(rows_k, cols_k), device=feature.device)
    # per ROI, the window of the map its bins cover, and each bin's cells inside that window
    win_y0, win_y1 = y0.min(1).values, torch.maximum(y1.max(1).values, y0.min(1).values + 1).clamp(max=h)
    win_x0, win_x1 = x0.min(1).values, torch.maximum(x1.max(1).values, x0.min(1).values + 1).clamp(max=w)
    win_y0, win_x0 = torch.minimum(win_y0, win_y1 - 1), torch.minimum(win_x0, win_x1 - 1)
    rows = (y0[:, :, None] + span[None, None, :rows_k]).minimum((y1 - 1).clamp(min=0)[:, :, None])
    cols = (x0[:, :, None] + span[None, None, :cols_k]).minimum((x1 - 1).clamp(min=0)[:, :, None])
    rows = (rows.clamp(max=h - 1) - win_y0[:, None, None]).clamp(min=0)
    cols = (cols.clamp(max=w - 1) - win_x0[:, None, None]).clamp(min=0)
    n_rows = (y1 - y0).clamp(min=1).max(1).values.tolist()
    n_cols = (x1 - x0).clamp(min=1).max(1).values.tolist()
    wy0, wy1, wx0, wx1 = win_y0.tolist(), win_y1.tolist(), win_x0.tolist(), win_x1.tolist()
    ph = torch.arange(output, device=feature.device)[:, None]
    for i in range(r):
        window = hwc[wy0[i]:wy1[i], wx0[i]:wx1[i]].contiguous()  # index_select copies a strided one per call
        wc = window.shape[1]
        rows_i = rows[i]
        rmax = window.index_select(0, rows_i[:, 0])  # (output, wc, C): whole rows, contiguous copies
        for k in range(1, n_rows[i]):
            torch.maximum(rmax, window.index_select(0, rows_i[:, k]), out=rmax)
        # columns as rows of the flattened (output * wc, C) matrix: a leading-dim gather again
        flat = rmax.view(-1, c)
        cols_i = cols[i][None, :, :] + ph[:, :, None] * wc  # (output, output, k)
        o = out[i].view(-1, c)
        torch.index_select(flat, 0, cols_i[:, :, 0].reshape(-1), out=o)
        for k in range(1, n_cols[i]):
            torch.maximum(o, flat.index_select(0, cols_i[:, :, k].reshape(-1)), out=o)
    if bool(empty.any()):
        out.masked_fill_(empty[..., None], 0)
    return out.permute(0, 3, 1, 2)
