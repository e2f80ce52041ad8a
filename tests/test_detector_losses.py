"""Detector training targets and losses against hand computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from teranprep.extractors.butd.ops import decode_boxes
from teranprep.extractors.butd.training.losses import (RoiSample, RoiSettings, RpnSettings,
                                                attr_logits_for_labels, encode_boxes, label_anchors,
                                                roi_losses, rpn_losses, sample_rois, subsample_labels)


def test_encode_is_the_inverse_of_the_models_decode():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 2, generator=g) * 100
    ref = torch.cat([ref, ref + 5 + torch.rand(50, 2, generator=g) * 60], 1)
    gt = torch.rand(50, 2, generator=g) * 100
    gt = torch.cat([gt, gt + 5 + torch.rand(50, 2, generator=g) * 60], 1)
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        back = decode_boxes(encode_boxes(gt, ref, weights), ref, weights)
        assert torch.allclose(back, gt, atol=1e-4)
    # by hand: ref [0,0,9,9] is 10 px wide (+1 widths), centre 5; gt [2,2,12,12] spans 10, centre 7
    t = encode_boxes(torch.tensor([[2.0, 2, 12, 12]]), torch.tensor([[0.0, 0, 9, 9]]))
    assert torch.allclose(t, torch.tensor([[0.2, 0.2, 0.0, 0.0]]), atol=1e-6)


def test_anchor_labels_by_iou_and_every_box_gets_its_best_anchor():
    anchors = torch.tensor([[0.0, 0, 9, 9], [0, 0, 19, 19], [50, 50, 59, 59], [30, 30, 39, 39]])
    gt = torch.tensor([[0.0, 0, 9, 9], [30, 30, 33, 33]])
    labels, matched = label_anchors(anchors, gt, fg_iou=0.7, bg_iou=0.3)
    # IoU (+1 widths): a0/g0 = 1; a1/g0 = 100/400; a2 nothing; a3/g1 = 16/100 (below 0.3, but
    # it is g1's best anchor, so positive and matched to g1)
    assert labels.tolist() == [1, 0, 0, 1]
    assert matched[0] == 0 and matched[3] == 1
    empty, _ = label_anchors(anchors, torch.zeros(0, 4), 0.7, 0.3)
    assert empty.tolist() == [0, 0, 0, 0]


def test_subsampling_caps_positives_and_fills_with_negatives():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    out = subsample_labels(labels, 16, 0.5, torch.Generator().manual_seed(1))
    assert (out == 1).sum() == 8 and (out == 0).sum() == 8
    assert ((out >= 0) <= (labels >= 0)).all() and (out[labels == 1] != 0).all()
    few = torch.tensor([1, 1] + [0] * 100)
    out = subsample_labels(few, 16, 0.5, torch.Generator().manual_seed(1))
    assert (out == 1).sum() == 2 and (out == 0).sum() == 14


def test_rpn_losses_match_a_hand_computation():
    anchors = torch.tensor([[0.0, 0, 9, 9], [100, 100, 109, 109]])
    gt = torch.tensor([[0.0, 0, 9, 9]])
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])  # (background, foreground)
    deltas = torch.zeros(2, 4)
    out = rpn_losses(logits, deltas, anchors, gt, RpnSettings(batch=256, fg_fraction=0.5,
                                                              fg_iou=0.7, bg_iou=0.3, beta=1 / 9))
    # anchor 0 positive, anchor 1 negative; both CE terms are log(1 + e^-2)
    assert out["rpn_cls"].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)
    # targets of anchor 0: centre 4.5 vs 5 over width 10 -> -0.05; log(9 / 10) for the sizes
    def sl1(x, beta=1 / 9):
        return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta
    expected = (2 * sl1(-0.05) + 2 * sl1(math.log(0.9))) / 2  # divided by the 2 sampled anchors
    assert out["rpn_box"].item() == pytest.approx(expected, rel=1e-5)


def test_roi_sampling_puts_foreground_first_with_its_box_class_and_attribute():
    proposals = torch.tensor([[0.0, 0, 9, 9], [60, 60, 69, 69], [1, 1, 10, 10]])
    gt = torch.tensor([[0.0, 0, 9, 9]])
    s = sample_rois(proposals, gt, torch.tensor([3]), torch.tensor([2]),
                    RoiSettings(batch=8, fg_fraction=0.5), (10.0, 10.0, 5.0, 5.0),
                    torch.Generator().manual_seed(0))
    # candidates: 3 proposals + the gt box; fg = proposal 0, proposal 2 (IoU 81/119) and gt
    assert s.labels.tolist() == [3, 3, 3, 0]
    assert s.attrs.tolist() == [2, 2, 2, 0]
    fg_boxes = {tuple(b.tolist()) for b in s.boxes[:3]}
    assert fg_boxes == {(0.0, 0.0, 9.0, 9.0), (1.0, 1.0, 10.0, 10.0)}
    assert s.boxes[3].tolist() == [60.0, 60.0, 69.0, 69.0]
    assert torch.allclose(decode_boxes(s.targets[:3], s.boxes[:3], (10.0, 10.0, 5.0, 5.0)),
                          gt.expand(3, 4), atol=1e-4)


def test_roi_losses_match_a_hand_computation():
    class_logits = torch.tensor([[0.5, 0.0, 2.0], [1.0, 0.0, 0.0]])
    box_deltas = torch.zeros(2, 12)
    box_deltas[0, 8:12] = torch.tensor([0.5, -2.0, 0.0, 0.25])  # class 2's deltas of roi 0
    targets = torch.zeros(2, 4)
    attr_logits = torch.tensor([[0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    sample = RoiSample(torch.zeros(2, 4), torch.tensor([2, 0]), targets, torch.tensor([1, 0]))
    out = roi_losses(class_logits, box_deltas, attr_logits, sample, RoiSettings(beta=1.0))

    def ce(logits, k):
        return -logits[k] + math.log(sum(math.exp(v) for v in logits))
    assert out["roi_cls"].item() == pytest.approx((ce([0.5, 0, 2], 2) + ce([1, 0, 0], 0)) / 2, rel=1e-5)
    # smooth L1, beta 1: .5*.25 + (2 - .5) + 0 + .5*.0625, summed, over 2 sampled rois
    assert out["roi_box"].item() == pytest.approx((0.125 + 1.5 + 0.03125) / 2, rel=1e-5)
    assert out["roi_attr"].item() == pytest.approx(ce([0, 1, 0], 1), rel=1e-5)  # foreground only


def test_attribute_head_is_fed_the_given_labels_not_the_predicted_class():
    from teranprep.extractors.butd.config import get_config
    from teranprep.extractors.butd.model import BoxPredictor
    torch.manual_seed(0)
    predictor = BoxPredictor(get_config("butd-tiny", num_classes=4, num_attrs=3), 16)
    features = torch.randn(5, 16)
    logits, _, attr_pred = predictor(features)
    same = attr_logits_for_labels(predictor, features, logits.argmax(1))
    assert torch.allclose(same, attr_pred)
    other = attr_logits_for_labels(predictor, features, (logits.argmax(1) + 1) % 4)
    assert not torch.allclose(other, attr_pred)
    by_hand = predictor.attr_linear2(F.relu(predictor.attr_linear1(
        torch.cat([features, predictor.cls_embed.weight[(logits.argmax(1) + 1) % 4]], 1))))
    assert torch.allclose(other, by_hand)
