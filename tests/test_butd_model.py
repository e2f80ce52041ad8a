"""The BUTD network's pieces (butd-tiny, same code path as butd-r101) against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teranprep.extractors.base import DetectorSpec
from teranprep.extractors.box_policy import select_caffe
from teranprep.extractors.butd.config import get_config
from teranprep.extractors.butd.detector import ButdDetector, init_random
from teranprep.extractors.butd.model import ButdModel, RPNRaw
from teranprep.extractors.butd.ops import caffe_nms, clip_boxes, decode_boxes, preprocess

pytestmark = pytest.mark.threads  # bit-equal comparisons within one thread count


@pytest.fixture(scope="module")
def detector():
    return ButdDetector(DetectorSpec(model="butd-tiny", random_seed=0, min_boxes=5, max_boxes=12),
                        cfg=get_config("butd-tiny", post_nms_topk=40))


def image(seed=0, h=90, w=120):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[20:60, 30:90] = rng.integers(0, 255, 3)
    return img


def test_stem_pools_with_ceil_and_stride_sits_in_the_1x1_conv(detector):
    model = detector.model
    x = torch.zeros(1, 3, 600, 1000)
    with torch.no_grad():
        stem = model.backbone.stem(x)
        res4 = model.backbone(x)
    # conv 7x7/2 pad 3: 300 x 500; pool 3x3/2 no pad, ceil: ceil(297 / 2) + 1 = 150 (floor: 149)
    assert stem.shape[-2:] == (150, 250)
    assert res4.shape[-2:] == (38, 63)  # 1x1 stride-2 convs: 150 -> 75 -> 38, 250 -> 125 -> 63
    block = model.backbone.res3[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    res5 = model.roi_heads.res5[0]
    assert res5.conv1.stride == (1, 1) and res5.conv2.dilation == (2, 2) and res5.conv2.padding == (2, 2)
    assert ButdModel(get_config("butd-tiny")).backbone.stem.conv1.norm.eps == 1e-5
    # for inference the frozen norms are folded into the convs, in fp32 as in bf16
    assert isinstance(model.backbone.stem.conv1.norm, torch.nn.Identity)


def test_rpn_raw_is_height_width_anchor_ordered_with_bg_fg_halves(detector):
    model = detector.model
    a = model.cfg.num_anchors
    fmap = torch.randn(1, model.cfg.stage_out(4), 3, 5)
    with torch.no_grad():
        raw = model.rpn_raw(fmap)
        logits, deltas = model.proposal_generator.rpn_head(fmap)
    y, x, k = 2, 3, 7
    row = (y * 5 + x) * a + k
    assert raw.objectness_logits[row].tolist() == [logits[0, k, y, x].item(), logits[0, a + k, y, x].item()]
    assert raw.anchor_deltas[row].tolist() == deltas[0, 4 * k:4 * k + 4, y, x].tolist()
    cell = model.proposal_generator.anchor_generator.cell_anchors[0]
    assert raw.anchors[row].tolist() == (cell[k] + torch.tensor([x * 16, y * 16, x * 16, y * 16])).tolist()


def test_proposals_clip_drop_small_sort_and_nms_by_hand():
    model = ButdModel(get_config("butd-tiny"))
    # zero deltas decode a box one pixel wider (MILVLG: x2 = centre + w / 2 with w = x2 - x1 + 1)
    anchors = torch.tensor([[0, 0, 49, 49],      # A .9 -> [0, 0, 50, 50]
                            [1, 1, 50, 50],      # B .8 -> IoU(A) .925 >= .7: suppressed
                            [60, 60, 74, 74],    # C .95 -> width 16, not > 16: dropped
                            [60, 60, 76, 76],    # D .5 -> [60, 60, 77, 77]
                            [-10, -10, 30, 30],  # E .7 -> clipped to [0, 0, 31, 31]
                            [95, 95, 120, 120]], dtype=torch.float32)  # F .99: clipped to 5 px: dropped
    fg = torch.tensor([0.9, 0.8, 0.95, 0.5, 0.7, 0.99])
    raw = RPNRaw(torch.stack([torch.zeros(6), torch.log(fg / (1 - fg))], 1), torch.zeros(6, 4), anchors)
    boxes, scores = model.proposals(raw, (100, 100), 1.0)
    assert boxes.tolist() == [[0, 0, 50, 50], [0, 0, 31, 31], [60, 60, 77, 77]]
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.5])
    # the minimum size scales with the image: at scale 0.5 the 16-px box C passes (16 > 8) and,
    # scoring highest, suppresses D (IoU 256 / 324 = .79)
    boxes, _ = model.proposals(raw, (100, 100), 0.5)
    assert boxes.tolist() == [[60, 60, 75, 75], [0, 0, 50, 50], [0, 0, 31, 31]]


def test_detect_keeps_the_policy_boxes_with_their_proposal_features(detector):
    img = image()
    det = detector.detect([img])[0]
    model, cfg = detector.model, detector.cfg
    with torch.no_grad():
        x, scale = preprocess(img, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        res4 = model.backbone(x)
        props, _ = model.proposals(model.rpn_raw(res4), tuple(x.shape[-2:]), scale)
        head = model.head_outputs(res4, props)
    dets = clip_boxes(props, *x.shape[-2:]) / scale
    probs = torch.softmax(head.class_logits, 1)[:, 1:]
    max_conf = torch.zeros(len(props))  # the reference loop over classes
    for c in range(probs.shape[1]):
        keep = caffe_nms(dets, probs[:, c], cfg.class_nms)
        max_conf[keep] = torch.maximum(max_conf[keep], probs[keep, c])
    keep = select_caffe(max_conf, 0.2, 5, 12)
    np.testing.assert_array_equal(det.boxes, dets[keep].numpy())
    np.testing.assert_array_equal(det.features, head.features[keep].numpy())
    assert det.class_ids.tolist() == probs[keep].argmax(1).tolist()
    assert 5 <= len(det.boxes) <= 12 and det.attr_ids is not None


def test_given_boxes_get_the_features_the_model_computes_for_them(detector):
    img = image(1, 80, 140)
    boxes = np.array([[0, 0, 139, 79], [10.5, 20, 60, 70], [100, 5, 130, 30]], np.float32)
    det = detector.detect([img], [boxes])[0]
    model, cfg = detector.model, detector.cfg
    with torch.no_grad():
        x, scale = preprocess(img, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        head = model.head_outputs(model.backbone(x), torch.from_numpy(boxes) * scale)
    np.testing.assert_array_equal(det.boxes, boxes)
    np.testing.assert_array_equal(det.features, head.features.numpy())
    empty = detector.detect([img], [np.zeros((0, 4), np.float32)])[0]
    assert empty.features.shape == (0, cfg.feature_dim)


def test_regressed_box_option_decodes_the_top_class_deltas(detector):
    cfg = detector.cfg
    spec = DetectorSpec(model="butd-tiny", min_boxes=4, max_boxes=4)
    unfolded = ButdModel(cfg)  # a detector's own model has its norms folded: not a checkpoint's layout
    init_random(unfolded, 0)
    state = unfolded.state_dict()
    props_det = ButdDetector(spec, cfg=cfg, state_dict=state)
    reg_det = ButdDetector(DetectorSpec(model="butd-tiny", min_boxes=4, max_boxes=4,
                                        options=(("box_source", "regressed"),)), cfg=cfg, state_dict=state)
    img = image(2)
    a, b = props_det.detect([img])[0], reg_det.detect([img])[0]
    np.testing.assert_array_equal(a.features, b.features)
    with torch.no_grad():
        x, scale = preprocess(img, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        head = reg_det.model.head_outputs(reg_det.model.backbone(x), torch.from_numpy(a.boxes) * scale)
    label = torch.from_numpy(a.class_ids).long() + 1
    deltas = head.box_deltas.view(4, -1, 4)[torch.arange(4), label]
    expected = clip_boxes(decode_boxes(deltas, torch.from_numpy(a.boxes) * scale, cfg.bbox_reg_weights),
                          *x.shape[-2:]) / scale
    np.testing.assert_allclose(b.boxes, expected.numpy(), rtol=1e-5, atol=1e-3)
    assert not np.allclose(a.boxes, b.boxes)


def test_random_weights_are_deterministic_seed_dependent_and_calibrated(detector):
    cfg = detector.cfg
    s0 = ButdDetector(DetectorSpec(model="butd-tiny", random_seed=0), cfg=cfg).model.state_dict()
    s6 = ButdDetector(DetectorSpec(model="butd-tiny", random_seed=6), cfg=cfg).model.state_dict()
    ref = detector.model.state_dict()
    assert all(torch.equal(s0[k], ref[k]) for k in ref)
    assert not torch.equal(s6["backbone.res2.0.conv1.weight"], ref["backbone.res2.0.conv1.weight"])
    # calibrated batch norms: res4 activations of a real-looking image stay O(1)
    with torch.no_grad():
        x, _ = preprocess(image(3), cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        res4 = detector.model.backbone(x)
    assert torch.isfinite(res4).all() and 0.05 < float(res4.std()) < 20


def test_training_pieces_give_gradients_to_rpn_and_heads():
    model = ButdModel(get_config("butd-tiny"))
    x = torch.randn(1, 3, 96, 128)
    res4 = model.backbone(x)
    raw = model.rpn_raw(res4)
    head = model.head_outputs(res4, torch.tensor([[0.0, 0.0, 60.0, 50.0], [20.0, 10.0, 120.0, 90.0]]))
    labels = torch.zeros(len(raw.anchors), dtype=torch.long)
    loss = (torch.nn.functional.cross_entropy(raw.objectness_logits, labels) + raw.anchor_deltas.abs().mean()
            + torch.nn.functional.cross_entropy(head.class_logits, torch.tensor([3, 0]))
            + head.box_deltas.abs().mean() + head.attr_logits.logsumexp(1).mean())
    loss.backward()
    for name in ("proposal_generator.rpn_head.conv.weight", "roi_heads.res5.0.conv2.weight",
                 "roi_heads.box_predictor.attr_linear1.weight", "backbone.res2.0.conv1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
