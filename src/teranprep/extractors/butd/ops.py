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
    On a CPU the loop runs in NumPy: the same IEEE operations in the boxes' dtype in the same
    order, so the same keeps, at a fraction of torch's per-call cost (the RPN's 6000 -> 300:
    21.7 -> 9.4 ms an image, alternating in one run; benchmarks/README.md).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = descending_order(scores)
    b = boxes[order]
    if b.device.type == "cpu":
        kept = _nms_sorted(np.ascontiguousarray(b.numpy().T), threshold, max_keep, np)
    else:
        kept = _nms_sorted(b.t(), threshold, max_keep, torch)
    return torch.sort(order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]).values


def _nms_sorted(coords, threshold: float, max_keep: int | None, xp) -> list[int]:
    """Caffe NMS over boxes sorted by descending score, given as their 4 coordinate rows (x1,
    y1, x2, y2); `xp`: numpy or torch, whichever holds them. -> kept positions, in order."""
    x1, y1, x2, y2 = coords
    n = x1.shape[0]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    suppressed = xp.zeros_like(x1, dtype=bool)
    kept = []
    pos = 0
    while pos < n:
        i = pos
        kept.append(i)
        if max_keep is not None and len(kept) >= max_keep:
            break
        rest = slice(i + 1, n)
        w = (xp.minimum(x2[i], x2[rest]) - xp.maximum(x1[i], x1[rest]) + 1).clip(min=0)
        h = (xp.minimum(y2[i], y2[rest]) - xp.maximum(y1[i], y1[rest]) + 1).clip(min=0)
        inter = w * h
        suppressed[rest] |= inter / (areas[i] + areas[rest] - inter) >= threshold
        later = ~suppressed[i + 1:]
        alive = later.nonzero()[0] if xp is np else later.nonzero(as_tuple=True)[0]
        if len(alive) == 0:
            break
        pos = i + 1 + int(alive[0])
    return kept


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


class RoiMaxPool:
    """Caffe ROIPooling (= torchvision.ops.roi_pool) of one image's (1, C, H, W) map for all of
    its `boxes`, for inference: the same bins and the same maximum, so the same values bit for
    bit in any dtype (a max rounds nothing); computed in the map's own dtype. `pool(start, stop)`
    -> boxes[start:stop] pooled, channels-last (R, C, output, output), the layout res5 runs in.

    A sparse table: level (a, b) holds at (y, x) the maximum over rows y..y+2^a-1 and columns
    x..x+2^b-1, built once per map for the levels the boxes' bins need (a bin has at most
    ceil(H / output) + 1 rows). A bin of h x w cells with a = floor(log2 h), b = floor(log2 w)
    is the maximum of level (a, b) at its four corners' windows, which cover it exactly (two
    windows of 2^a >= h / 2 rows, two of 2^b columns; a cell counted twice changes no maximum).
    Where every bin of a box is at most 2 cells high (a box up to ~14 cells tall), both row
    windows are the same one and are read once; likewise for columns. So a ROI costs one gather
    of 1, 2 or 4 x output^2 rows of C values from a map that stays in cache, where the separable
    per-box loop it replaces copied the box's window and its row maxima (3.4x its time in bf16,
    2.1x in fp32, on 300 proposals an image: benchmarks/bench_roi_pool.py). Empty bins are 0.
    Memory: one map copy per level built, 3 x 3 levels at most for boxes inside a 600 x 1000
    image; only a given box larger than the map reaches (log2 H + 1) x (log2 W + 1) (36 copies
    of a 38 x 63 res4, 176 MB in bf16).
    A map with no negative value (res4 comes out of a ReLU) is compared as integers of the same
    width: non-negative IEEE floats order as their bit patterns do, and integer maxima are
    several times faster than bf16 ones here. `nonnegative` saves that check when the caller
    knows it."""

    def __init__(self, feature: torch.Tensor, boxes: torch.Tensor, output: int, spatial_scale: float,
                 nonnegative: bool | None = None):
        _, c, h, w = feature.shape
        self.dtype, self.output, self.channels, self.device = feature.dtype, output, c, feature.device
        self.count = r = boxes.shape[0]
        as_int = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}.get(feature.dtype)
        if nonnegative is None and as_int is not None and r:
            nonnegative = is_nonnegative(feature)
        hwc = feature[0].permute(1, 2, 0).contiguous()  # (H, W, C): a view of a channels-last map
        if as_int is not None and nonnegative:
            hwc = hwc.view(as_int)
        self.work_dtype = hwc.dtype  # the dtype the maxima are taken in
        if r == 0:
            return
        y0, y1, x0, x1 = roi_pool_bins(boxes, h, w, output, spatial_scale)
        self.empty = (y1 <= y0)[:, :, None] | (x1 <= x0)[:, None, :]  # (R, output, output)
        rows, cols = (y1 - y0).clamp(min=1), (x1 - x0).clamp(min=1)
        a, b = _floor_log2(rows), _floor_log2(cols)  # (R, output) each
        levels_b = int(b.max()) + 1
        # per row level, the widest column level a ROI with a bin of that height has
        widest_of_roi = b.max(1).values
        widest = [int(torch.where((a == level).any(1), widest_of_roi, 0).max()) for level in range(int(a.max()) + 1)]
        self.tables = _max_tables(hwc, widest, levels_b).view(-1, c)
        # the two row windows of each bin (the first for an empty bin: any valid cell, masked to 0)
        top, bottom = y0.clamp(max=h - 1), (y0 + rows - (1 << a)).clamp(0, h - 1)
        left, right = x0.clamp(max=w - 1), (x0 + cols - (1 << b)).clamp(0, w - 1)
        level = (a[:, :, None] * levels_b + b[:, None, :]) * (h * w)
        corner = lambda ys, xs: (level + ys[:, :, None] * w + xs[:, None, :]).view(r, -1)  # noqa: E731
        self.index = torch.stack([corner(top, left), corner(bottom, left), corner(top, right),
                                  corner(bottom, right)], 1)  # (R, 4, output^2)
        self.corners = [_CORNERS[pair] for pair in zip((top != bottom).any(1).tolist(),
                                                        (left != right).any(1).tolist())]

    def __call__(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.count if stop is None else min(stop, self.count)
        n, c, o = max(0, stop - start), self.channels, self.output
        out = torch.empty((n, o, o, c), dtype=self.work_dtype, device=self.device)
        # One ROI at a time: its gather (0.4-1.6 MB) stays in cache. Gathering a chunk's windows
        # at once and maxing them in measured slower here (each pass then goes to memory).
        for k, i in enumerate(range(start, stop)):
            corners = self.corners[i]
            dst = out[k].view(-1, c)
            if len(corners) == 1:
                torch.index_select(self.tables, 0, self.index[i, 0], out=dst)
                continue
            got = self.tables.index_select(0, self.index[i, corners].view(-1)).view(len(corners), -1, c)
            torch.maximum(got[0], got[1], out=dst)  # (amax would first fill dst with its identity)
            for more in got[2:]:
                torch.maximum(dst, more, out=dst)
        if n and bool(self.empty[start:stop].any()):
            out.masked_fill_(self.empty[start:stop, ..., None], 0)
        return out.view(self.dtype).permute(0, 3, 1, 2)


# the windows (top-left, bottom-left, top-right, bottom-right) a ROI reads, by whether any of its
# bins needs two row windows, two column windows
_CORNERS = {(False, False): [0], (True, False): [0, 1], (False, True): [0, 2], (True, True): [0, 1, 2, 3]}


def is_nonnegative(t: torch.Tensor) -> bool:
    """No element below 0 (a NaN fails the test). min() over a channels-last map as laid out in
    memory: torch's min() of the map itself copies it to NCHW first (10 ms of a res4 here)."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return bool(t.min() >= 0)


def _floor_log2(t: torch.Tensor) -> torch.Tensor:
    """floor(log2 t) of positive integers, exactly (frexp: t = m * 2^e, 0.5 <= m < 1)."""
    return torch.frexp(t.double())[1].long() - 1


def _max_tables(hwc: torch.Tensor, widest: list[int], levels_b: int) -> torch.Tensor:
    """(len(widest), levels_b, H, W, C): level (a, b) at (y, x) = max of hwc over rows
    y..y+2^a-1 and columns x..x+2^b-1 where those lie inside the map (entries nearer the edge
    hold a max over fewer cells; no bin's window reads them). Only levels b <= widest[a] are
    filled: the others are left unset, as no bin reads them."""
    h, w, _ = hwc.shape
    out = torch.empty((len(widest), levels_b) + tuple(hwc.shape), dtype=hwc.dtype, device=hwc.device)
    out[0, 0] = hwc
    for a, top in enumerate(widest):
        if a:
            s = 1 << (a - 1)
            out[a, 0, h - s:] = out[a - 1, 0, h - s:]
            torch.maximum(out[a - 1, 0, :h - s], out[a - 1, 0, s:], out=out[a, 0, :h - s])
        for b in range(1, top + 1):
            s = 1 << (b - 1)
            out[a, b, :, w - s:] = out[a, b - 1, :, w - s:]
            torch.maximum(out[a, b - 1, :, :w - s], out[a, b - 1, :, s:], out=out[a, b, :, :w - s])
    return out
