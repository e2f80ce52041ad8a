"""The Caffe tool's box policy: batched per-class NMS equals a per-class loop; hand-made selections."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from teranprep.extractors.box_policy import per_class_nms_max_conf, select_caffe
from teranprep.extractors.butd.ops import caffe_nms


def max_conf_loop(boxes, scores, thr):
    """MILVLG's save_roi_features: one NMS per class, max_conf raised with a strict >."""
    max_conf = torch.zeros(scores.shape[0])
    for c in range(scores.shape[1]):
        keep = caffe_nms(boxes, scores[:, c], thr)
        max_conf[keep] = torch.where(scores[keep, c] > max_conf[keep], scores[keep, c], max_conf[keep])
    return max_conf


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2 ** 31 - 1), st.booleans())
def test_batched_per_class_nms_equals_a_loop_over_classes(n, c, seed, quantised):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, 40, (n, 2), generator=gen).float()
    wh = torch.randint(0, 25, (n, 2), generator=gen).float()
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, c, generator=gen)
    if quantised:  # exact ties inside a class
        scores = (scores * 4).floor() / 4
    batched = per_class_nms_max_conf(boxes, scores, 0.3)
    assert torch.equal(batched, max_conf_loop(boxes, scores, 0.3))


def test_max_conf_takes_the_best_class_that_kept_the_box():
    boxes = torch.tensor([[0, 0, 9, 9], [1, 1, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    # class 0: box 0 wins and suppresses box 1; class 1: box 1 wins
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.05, 0.02]])
    assert per_class_nms_max_conf(boxes, scores, 0.3).tolist() == torch.tensor([0.9, 0.3, 0.05]).tolist()


def test_select_keeps_passing_boxes_in_proposal_order():
    conf = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.25, 0.05])
    assert select_caffe(conf, 0.2, 1, 10).tolist() == [0, 1, 3, 4]


def test_select_tops_up_to_min_boxes_by_confidence():
    conf = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.15, 0.05])
    assert select_caffe(conf, 0.4, 4, 10).tolist() == [1, 3, 0, 4]


def test_select_cuts_to_max_boxes_by_confidence():
    conf = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.25, 0.05])
    assert select_caffe(conf, 0.2, 1, 2).tolist() == [1, 3]


def test_fixed_k_gives_exactly_k_and_keeps_order_when_exactly_k_pass():
    conf = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.25, 0.05])
    assert select_caffe(conf, 0.2, 3, 3).tolist() == [1, 3, 0]  # 4 pass -> top 3 by confidence
    assert select_caffe(conf, 0.28, 3, 3).tolist() == [0, 1, 3]  # exactly 3 pass -> proposal order
    assert select_caffe(conf, 0.95, 3, 3).tolist() == [1, 3, 0]  # none pass -> top 3


def test_select_breaks_exact_ties_by_index_and_returns_all_when_fewer_than_min():
    conf = torch.tensor([0.5, 0.7, 0.5, 0.5])
    assert select_caffe(conf, 0.9, 3, 3).tolist() == [1, 0, 2]
    assert select_caffe(conf, 0.9, 10, 20).tolist() == [1, 0, 2, 3]
    assert select_caffe(conf, 0.5, 1, 10).tolist() == [0, 1, 2, 3]  # >= threshold passes


def test_batched_per_class_nms_equals_the_loop_across_several_packed_words():
    # 150 boxes span 3 int64 words, including bit 63 (the sign bit) of the first two
    gen = torch.Generator().manual_seed(7)
    xy = torch.randint(0, 120, (150, 2), generator=gen).float()
    boxes = torch.cat([xy, xy + torch.randint(5, 60, (150, 2), generator=gen).float()], 1)
    scores = torch.softmax(torch.randn(150, 7, generator=gen) * 3, 1)
    assert torch.equal(per_class_nms_max_conf(boxes, scores, 0.3), max_conf_loop(boxes, scores, 0.3))
