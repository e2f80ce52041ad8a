"""VOC-style AP@0.5 against hand-computed precision-recall cases."""

from __future__ import annotations

import numpy as np
import pytest

from teranprep.extractors.butd.training.ap import (ImageDetections, ImageTruth, average_precision,
                                               class_average_precision, mean_average_precision)


def dets(boxes, scores, labels, attrs=None):
    return ImageDetections(np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float),
                           np.asarray(labels), None if attrs is None else np.asarray(attrs))


def truth(boxes, labels, attrs=None):
    return ImageTruth(np.asarray(boxes, float).reshape(-1, 4), np.asarray(labels),
                      None if attrs is None else np.asarray(attrs))


def test_tp_fp_tp_sequence_gives_the_hand_computed_area():
    # 2 objects; detections by score: hit, miss, hit. PR points (R, P): (.5, 1), (.5, .5), (1, 2/3)
    # monotone envelope: P = 1 up to R = .5, then 2/3 -> AP = .5 * 1 + .5 * 2/3
    gt = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    d = [dets([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [1, 1, 1])]
    ap, _ = class_average_precision(d, gt, 1)
    assert ap == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_a_duplicate_detection_is_a_false_positive_and_a_missed_object_caps_recall():
    gt = [truth([[0, 0, 10, 10]], [1])]
    d = [dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])]
    ap, info = class_average_precision(d, gt, 1)
    assert ap == pytest.approx(1.0)  # recall reaches 1 at precision 1 before the duplicate
    assert [m[2] for m in info["matches"]] == [True, False]
    gt2 = [truth([[0, 0, 10, 10], [40, 40, 50, 50]], [1, 1])]
    assert class_average_precision(d, gt2, 1)[0] == pytest.approx(0.5)


def test_iou_exactly_at_threshold_counts_and_just_below_does_not():
    gt = [truth([[0, 0, 10, 10]], [1])]
    assert class_average_precision([dets([[0, 0, 10, 5]], [1.0], [1])], gt, 1)[0] == 1.0  # IoU 0.5
    assert class_average_precision([dets([[0, 0, 10, 4.9]], [1.0], [1])], gt, 1)[0] == 0.0


def test_detections_rank_across_images_and_wrong_class_never_matches():
    # image A: one object, detected with score .6; image B: one object, a false alarm at .9 and
    # its hit at .5. Order: FP(.9), TP(.6), TP(.5): PR (0, 0), (.5, .5), (1, 2/3) -> AP = 2/3
    gt = [truth([[0, 0, 10, 10]], [1]), truth([[0, 0, 10, 10]], [1])]
    d = [dets([[0, 0, 10, 10]], [0.6], [1]), dets([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.5], [1, 1])]
    assert class_average_precision(d, gt, 1)[0] == pytest.approx(2 / 3)
    wrong = [dets([[0, 0, 10, 10]], [0.9], [2]), dets([], [], [])]
    assert class_average_precision(wrong, gt, 1)[0] == 0.0


def test_map_averages_only_classes_with_ground_truth_and_reports_attribute_accuracy():
    gt = [truth([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], attrs=[3, 4])]
    d = [dets([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 2, 3],
              attrs=[3, 1, 2])]
    result = mean_average_precision(d, gt, [1, 2, 3])
    assert set(result["per_class"]) == {1, 2}  # class 3 has no object: left out, not zero
    assert result["map"] == pytest.approx(1.0)
    assert result["attr_accuracy"] == pytest.approx(0.5)  # one of the two hits has the right colour


def test_average_precision_of_a_curve_uses_the_monotone_envelope():
    recall = np.array([0.25, 0.25, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 0.6, 0.5])
    # envelope: .25 -> 1, .5 -> .6, .75 -> .5, recall never reaches 1
    assert average_precision(recall, precision) == pytest.approx(0.25 * 1 + 0.25 * 0.6 + 0.25 * 0.5)
