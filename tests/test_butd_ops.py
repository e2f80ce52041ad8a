"""BUTD's Caffe-convention ops against direct loops, cv2 and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from teranprep.extractors.butd.ops import (caffe_cell_anchors, caffe_nms, decode_boxes, grid_anchors,
                                           image_scale, preprocess, resize_bilinear_by_scale)


def nms_loop(boxes, scores, thr):
    """Caffe's nms_cpu_kernel, line by line, in float32."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    one = np.float32(1)
    areas = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    order = sorted(range(len(b)), key=lambda i: -scores[i])  # stable: ties by index
    suppressed = [False] * len(b)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        for j in order[pos + 1:]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]) + one)
            h = max(np.float32(0), min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]) + one)
            inter = np.float32(w * h)
            if inter / (areas[i] + areas[j] - inter) >= thr:
                suppressed[j] = True
    return [i for i in range(len(b)) if not suppressed[i]]


boxes_st = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 20), st.integers(0, 20)),
                    min_size=0, max_size=25)


@settings(max_examples=150, deadline=None)
@given(boxes_st, st.data(), st.sampled_from([0.3, 0.5, 0.7]))
def test_caffe_nms_equals_the_kernel_loop(raw, data, thr):
    boxes = [[x, y, x + w, y + h] for x, y, w, h in raw]
    # scores from a small set, so exact ties happen
    scores = data.draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.9]), min_size=len(boxes), max_size=len(boxes)))
    kept = caffe_nms(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                     torch.tensor(scores, dtype=torch.float32), thr)
    assert kept.tolist() == nms_loop(boxes, scores, thr)


@pytest.mark.parametrize("seed", [0, 1])
def test_caffe_nms_numpy_and_torch_loops_agree_on_fractional_boxes(seed):
    """caffe_nms runs its loop in NumPy on a CPU and in torch elsewhere: on decoded-like boxes
    (fractional float32 corners, 1,000 of them, clustered so that many overlap near the
    threshold, with tied scores) both keep exactly what the kernel loop keeps."""
    from teranprep.extractors.butd.ops import _nms_sorted, descending_order
    gen = torch.Generator().manual_seed(seed)
    centres = torch.rand(40, 2, generator=gen) * torch.tensor([900.0, 500.0])
    xy = centres[torch.randint(0, 40, (1000,), generator=gen)] + torch.randn(1000, 2, generator=gen) * 12
    wh = torch.rand(1000, 2, generator=gen) * 120 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.randint(0, 200, (1000,), generator=gen).float() / 200  # many exact ties
    for thr, max_keep in ((0.7, 300), (0.3, None)):
        kept = caffe_nms(boxes, scores, thr, max_keep=max_keep)
        expected = nms_loop(boxes.tolist(), scores.tolist(), thr)
        if max_keep is not None:  # the first max_keep keeps in score order, then ascending
            rank = {int(i): r for r, i in enumerate(descending_order(scores))}
            expected = sorted(sorted(expected, key=rank.get)[:max_keep])
        assert kept.tolist() == expected
        b = boxes[descending_order(scores)]
        assert _nms_sorted(b.t(), thr, max_keep, torch) == _nms_sorted(b.numpy().T.copy(), thr, max_keep, np)


def test_caffe_nms_suppresses_at_equal_iou_where_torchvision_keeps():
    # +1 widths: areas 100 and 50, overlap 50 -> IoU exactly 0.5
    boxes = torch.tensor([[0, 0, 9, 9], [0, 0, 9, 4]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8])
    assert caffe_nms(boxes, scores, 0.5).tolist() == [0]
    assert torchvision.ops.nms(boxes + torch.tensor([0, 0, 1, 1.0]), scores, 0.5).tolist() == [0, 1]


def test_caffe_nms_returns_ascending_indices_and_max_keep_truncates_in_score_order():
    boxes = torch.tensor([[0, 0, 5, 5], [20, 20, 25, 25], [40, 40, 45, 45], [60, 60, 65, 65]], dtype=torch.float32)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    assert caffe_nms(boxes, scores, 0.7).tolist() == [0, 1, 2, 3]
    assert caffe_nms(boxes, scores, 0.7, max_keep=2).tolist() == [1, 3]


def test_caffe_anchors_are_the_published_values():
    anchors = caffe_cell_anchors().numpy()
    assert anchors.shape == (12, 4)
    # generate_anchors() of py-faster-rcnn, ratio 0.5 at scales 8 and 16, ratio 1 at scale 8
    assert anchors[1].tolist() == [-84, -40, 99, 55]
    assert anchors[2].tolist() == [-176, -88, 191, 103]
    assert anchors[5].tolist() == [-56, -56, 71, 71]


def test_grid_anchors_are_in_height_width_anchor_order():
    cell = torch.tensor([[0, 0, 1, 1], [0, 0, 3, 3]], dtype=torch.float32)
    grid = grid_anchors(cell, 2, 3, 16)
    assert grid.shape == (12, 4)
    # index = (y * W + x) * A + a
    y, x, a = 1, 2, 1
    assert grid[(y * 3 + x) * 2 + a].tolist() == [32, 16, 35, 19]


def test_decode_uses_plus_one_widths_and_clamps_the_scale():
    box = torch.tensor([[10.0, 20.0, 29.0, 59.0]])  # w = 20, h = 40, centre (20, 40)
    deltas = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0]])
    out = decode_boxes(deltas, box)[0].tolist()
    # centre x = 20 + 0.5 * 20 = 30, w = 40 -> x1 = 10, x2 = 50; centre y = 40 - 10 = 30, h = 40
    assert out == pytest.approx([10.0, 10.0, 50.0, 50.0])
    huge = decode_boxes(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), box)[0]
    assert float(huge[2] - huge[0]) == pytest.approx(20 * 1000 / 16, rel=1e-5)


def test_image_scale_rule():
    assert image_scale(480, 640) == pytest.approx(1.25)
    assert image_scale(300, 1000) == pytest.approx(1.0)  # 2.0 would make the long side 2000
    assert image_scale(640, 480) == pytest.approx(1.25)
    # 600 / 403 * 672 = 1000.496: rounds to 1000, so the scale is NOT reduced
    assert image_scale(403, 672) == pytest.approx(600 / 403)
    assert image_scale(403, 673) == pytest.approx(1000 / 673)


def test_resize_maps_pixels_by_the_scale_like_cv2_by_hand():
    x = torch.tensor([[[[10.0, 20.0]]]])  # 1 x 2
    out = resize_bilinear_by_scale(x, 2.0)
    assert out.shape[-2:] == (2, 4)
    assert out[0, 0, 0].tolist() == pytest.approx([10.0, 12.5, 17.5, 20.0])


def test_resize_matches_cv2_with_a_rounded_output_size():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for (h, w), scale in [((5, 7), 1.3), ((37, 53), 600 / 37), ((403, 672), 600 / 403), ((64, 50), 0.77)]:
        img = (rng.random((h, w, 3)) * 255 - 120).astype(np.float32)
        ref = cv2.resize(img, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        ours = resize_bilinear_by_scale(torch.from_numpy(img).permute(2, 0, 1)[None], scale)[0].permute(1, 2, 0).numpy()
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_preprocess_is_bgr_minus_the_caffe_mean():
    img = np.zeros((600, 800, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 50  # R, G, B
    x, scale = preprocess(img, (102.9801, 115.9465, 122.7717), 600, 1000)
    assert scale == 1.0 and x.shape == (1, 3, 600, 800)
    assert x[0, :, 10, 10].tolist() == pytest.approx([50 - 102.9801, 100 - 115.9465, 200 - 122.7717], abs=1e-4)


def roi_pool_loop(feat, box, out, ss):
    """Caffe ROIPoolingForward for one box on a (C, H, W) map."""
    c, h, w = feat.shape
    rnd = lambda v: math.floor(v + 0.5)  # C round(): half away from zero (coords >= 0)
    x1, y1, x2, y2 = (rnd(v * ss) for v in box)
    rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    res = np.zeros((c, out, out), np.float32)
    for ph in range(out):
        for pw in range(out):
            hs = min(max(math.floor(ph * rh / out) + y1, 0), h)
            he = min(max(math.ceil((ph + 1) * rh / out) + y1, 0), h)
            ws = min(max(math.floor(pw * rw / out) + x1, 0), w)
            we = min(max(math.ceil((pw + 1) * rw / out) + x1, 0), w)
            if he > hs and we > ws:
                res[:, ph, pw] = feat[:, hs:he, ws:we].max(axis=(1, 2))
    return res


def test_torchvision_roi_pool_is_caffe_roi_pooling():
    rng = np.random.default_rng(1)
    feat = rng.standard_normal((3, 12, 15)).astype(np.float32)
    # 8 / 16 = 0.5 exactly: C round gives 1 where Python's round would give 0
    boxes = [[8.0, 8.0, 100.0, 70.0], [0.0, 0.0, 239.0, 191.0], [40.0, 24.0, 41.0, 30.0], [200.0, 150.0, 260.0, 220.0]]
    ours = torchvision.ops.roi_pool(torch.from_numpy(feat)[None], [torch.tensor(boxes)], (7, 7), 1 / 16)
    for i, b in enumerate(boxes):
        np.testing.assert_array_equal(ours[i].numpy(), roi_pool_loop(feat, b, 7, 1 / 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_roi_max_pool_equals_torchvision_bit_for_bit(dtype, nonnegative):
    """The inference pooling (separable, in the map's dtype, integer compare for a ReLU map)
    against torchvision's Caffe kernel on the fp32 map: a max rounds nothing, so equal exactly.
    Boxes cover the map's edges, boxes partly and wholly outside it, one-cell and half-cell
    corners (C round) and boxes smaller than a bin (repeated cells)."""
    from teranprep.extractors.butd.ops import RoiMaxPool
    gen = torch.Generator().manual_seed(3)
    fmap = torch.randn(1, 24, 19, 31, generator=gen)
    if nonnegative:
        fmap = fmap.relu()  # ties at 0 too
    fmap = fmap.to(dtype)
    n = 120
    x1 = torch.rand(n, generator=gen) * 560 - 40
    y1 = torch.rand(n, generator=gen) * 340 - 40
    boxes = torch.stack([x1, y1, x1 + torch.rand(n, generator=gen) * 400 - 10,
                         y1 + torch.rand(n, generator=gen) * 250 - 10], 1)
    boxes[:6] = torch.tensor([[0, 0, 495, 303], [8, 8, 8, 8], [7.5, 7.49, 24.5, 40.5],
                              [900, 900, 990, 990], [-90, -90, -40, -40], [100, 50, 101, 51]])
    expected = torchvision.ops.roi_pool(fmap.float(), [boxes], (7, 7), 1 / 16).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = RoiMaxPool(fmap.contiguous(memory_format=layout), boxes, 7, 1 / 16)()
        assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, expected)
    assert (expected[3] == 0).all() and (expected[4] == 0).all()  # outside the map: empty bins
    assert RoiMaxPool(fmap, boxes[:0], 7, 1 / 16)().shape == (0, 24, 7, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roi_max_pool_tables_every_bin_size_and_chunks(dtype):
    """The sparse-table pooling over bins of 1..9 rows and columns (levels 0..3), with a
    tall-narrow and a wide-short box so that row level 3 needs only column level 0 and the
    level (3, 3) is left unset (a read of it would show): bit for bit torchvision's roi_pool, on a ReLU map (integer
    compare) and a signed one; pooling in chunks (as res5's ROI chunks ask) gives the same rows."""
    from teranprep.extractors.butd.ops import RoiMaxPool
    gen = torch.Generator().manual_seed(5)
    boxes = [[0, 0, k * 7 * 16 - 1, k * 7 * 16 - 1] for k in range(1, 10)]  # bins of k x k cells
    boxes += [[16, 0, 16 + 7 * 16 - 1, 63 * 16 - 1], [0, 32, 63 * 16 - 1, 32 + 7 * 16 - 1],  # 9 x 1, 1 x 9
              [5, 9, 300, 120], [100, 200, 104, 203]]
    # a given box far larger than the map (bins of up to the whole map) and broken ones
    boxes += [[-9000, -9000, 20000, 20000], [float("nan"), 0, 50, 50], [0, 0, float("inf"), 40]]
    boxes = torch.tensor(boxes, dtype=torch.float32)
    for signed in (False, True):
        fmap = torch.randn(1, 8, 64, 66, generator=gen)
        fmap = (fmap if signed else fmap.relu()).to(dtype).contiguous(memory_format=torch.channels_last)
        expected = torchvision.ops.roi_pool(fmap.float(), [boxes], (7, 7), 1 / 16).to(dtype)
        pool = RoiMaxPool(fmap, boxes, 7, 1 / 16)
        levels_a, levels_b = 7, 7  # a bin of all 64 rows, one of all 66 columns: floor(log2) + 1 each
        assert pool.tables.shape[0] == levels_a * levels_b * 64 * 66
        assert torch.equal(pool(), expected)
        assert torch.equal(torch.cat([pool(i, i + 3) for i in range(0, len(boxes), 3)]), expected)
        assert pool(5, 5).shape == (0, 8, 7, 7)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_is_nonnegative_reads_any_layout_and_fails_on_nan_or_a_negative(layout):
    """The check that sends a ReLU map to the integer-compare pooling: a NaN or one negative
    element anywhere (the last channel of the last cell too) must fail it, in either layout."""
    from teranprep.extractors.butd.ops import is_nonnegative
    fmap = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(0)).relu().bfloat16()
    assert is_nonnegative(fmap.contiguous(memory_format=layout))
    for where, value in (((0, 15, 4, 6), -1e-3), ((0, 3, 2, 1), float("nan")), ((0, 0, 0, 0), -5.0)):
        bad = fmap.clone()
        bad[where] = value
        assert not is_nonnegative(bad.contiguous(memory_format=layout))
