"""VinVL (extractors/vinvl/) on the small variant: the released checkpoint layout loads strictly and
wrong-model files are refused, the label map, the spatial 2054-d layout, selection against a
direct loop, bf16 drift, given boxes. Parity with the reference code: test_vinvl_golden.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from teranprep.errors import PrepError
from teranprep.extractors.base import DetectorSpec
from teranprep.extractors.vinvl.detector import VinvlDetector, box_geometry


def image(seed=0, h=90, w=120):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[20:60, 30:90] = rng.integers(0, 255, 3)
    return img


def released_name(ours: str) -> list[str]:
    """maskrcnn_benchmark's name(s) for one of our keys, written out independently of
    checkpoint.rename_key: res5 is saved twice (box head and attribute head)."""
    def block(rest):
        rest = re.sub(r"\.conv(\d)\.norm\.", r".bn\1.", rest)
        rest = rest.replace(".shortcut.norm.", ".downsample.1.").replace(".shortcut.weight", ".downsample.0.weight")
        return rest
    if ours == "backbone.stem.conv1.weight":
        return ["backbone.body.stem.conv1.weight"]
    if ours.startswith("backbone.stem.conv1.norm."):
        return ["backbone.body.stem.bn1." + ours.split(".")[-1]]
    m = re.match(r"backbone\.res(\d)\.(.*)", ours)
    if m:
        return [f"backbone.body.layer{int(m.group(1)) - 1}." + block("." + m.group(2))[1:]]
    m = re.match(r"roi_heads\.res5\.(.*)", ours)
    if m:
        inner = block("." + m.group(1))[1:]
        return ["roi_heads.box.feature_extractor.head.layer4." + inner, "attribute.feature_extractor.head.layer4." + inner]
    table = {"proposal_generator.anchor_generator.cell_anchors.0": "rpn.anchor_generator.cell_anchors.0",
             "proposal_generator.rpn_head.conv.": "rpn.head.conv.",
             "proposal_generator.rpn_head.objectness_logits.": "rpn.head.cls_logits.",
             "proposal_generator.rpn_head.anchor_deltas.": "rpn.head.bbox_pred.",
             "roi_heads.box_predictor.cls_score.": "roi_heads.box.predictor.cls_score.",
             "roi_heads.box_predictor.bbox_pred.": "roi_heads.box.predictor.bbox_pred.",
             "roi_heads.box_predictor.cls_embed.": "attribute.predictor.cls_embedding.",
             "roi_heads.box_predictor.attr_linear1.": "attribute.predictor.fc_attr.",
             "roi_heads.box_predictor.attr_linear2.": "attribute.predictor.attr_score."}
    for a, b in table.items():
        if ours.startswith(a):
            return [b + ours[len(a):]]
    raise AssertionError(ours)


@pytest.fixture(scope="module")
def tiny():
    return VinvlDetector(DetectorSpec(model="vinvl-tiny", random_seed=3))


@pytest.fixture(scope="module")
def released_ckpt(tmp_path_factory):
    """A vinvl-tiny checkpoint in the released layout, from an unfolded model with random weights."""
    from teranprep.extractors.vinvl.config import get_config
    from teranprep.extractors.vinvl.detector import init_random
    from teranprep.extractors.vinvl.model import VinvlModel
    model = VinvlModel(get_config("vinvl-tiny")).eval()
    init_random(model, 5)
    sd = {}
    for key, value in model.state_dict().items():
        for name in released_name(key):
            sd[name] = value.clone()
    path = tmp_path_factory.mktemp("vinvl") / "vinvl_tiny.pth"
    torch.save({"model": sd}, path)
    return path, model


def test_released_layout_loads_strictly_and_detects_as_the_unconverted_model(released_ckpt):
    path, model = released_ckpt
    big = VinvlDetector(DetectorSpec(model="vinvl-x152c4", weights=str(path)))  # sizes come from the keys
    assert big.cfg.stage_blocks == (1, 1, 1) and big.cfg.num_classes == 51 and big.cfg.num_attrs == 21
    assert (big.cfg.num_groups, big.cfg.width_per_group, big.cfg.res2_out) == (4, 4, 32)
    assert big.load_warnings == []
    det = VinvlDetector(DetectorSpec(model="vinvl-tiny", weights=str(path)))  # + tiny's proposal counts
    direct = VinvlDetector(DetectorSpec(model="vinvl-tiny"), state_dict=model.state_dict())
    a, b = det.detect([image(1)])[0], direct.detect([image(1)])[0]
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.features, b.features)


def test_a_missing_or_unknown_key_is_refused_in_one_line(released_ckpt, tmp_path):
    path, _ = released_ckpt
    sd = torch.load(path)["model"]
    cut = dict(sd)
    del cut["rpn.head.cls_logits.bias"]
    torch.save({"model": cut}, tmp_path / "cut.pth")
    with pytest.raises(PrepError, match="missing 1: proposal_generator.rpn_head.objectness_logits.bias"):
        VinvlDetector(DetectorSpec(model="vinvl-x152c4", weights=str(tmp_path / "cut.pth")))
    extra = dict(sd, **{"relation_head.fc.weight": torch.zeros(2, 2)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(PrepError, match="unexpected 1: relation_head.fc.weight"):
        VinvlDetector(DetectorSpec(model="vinvl-x152c4", weights=str(tmp_path / "extra.pth")))


def test_the_attribute_heads_res5_is_what_runs(released_ckpt, tmp_path):
    """scene_graph_benchmark shares one res5 between box and attribute heads and loads the
    attribute copy last: a changed box-head copy changes nothing, a changed attribute copy does."""
    path, _ = released_ckpt
    sd = torch.load(path)["model"]
    key = "conv1.weight"
    box = {k: (v * 0.5 if k.startswith("roi_heads.box.feature_extractor") and k.endswith(key) else v) for k, v in sd.items()}
    attr = {k: (v * 0.5 if k.startswith("attribute.feature_extractor") and k.endswith(key) else v) for k, v in sd.items()}
    outs = []
    for name, d in (("orig", sd), ("box", box), ("attr", attr)):
        torch.save({"model": d}, tmp_path / f"{name}.pth")
        det = VinvlDetector(DetectorSpec(model="vinvl-x152c4", weights=str(tmp_path / f"{name}.pth")))
        outs.append(det.detect([image(2)], [np.array([[5, 5, 80, 60]], np.float32)])[0].features)
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.allclose(outs[0], outs[2])


def test_butd_checkpoint_refused_by_vinvl_and_vinvl_checkpoint_refused_by_butd(released_ckpt, tmp_path):
    from teranprep.extractors.butd.detector import ButdDetector
    from teranprep.extractors.butd.model import ButdModel
    from teranprep.extractors.butd.config import get_config
    butd = tmp_path / "butd.pth"
    torch.save({"model": ButdModel(get_config("butd-tiny")).state_dict()}, butd)
    with pytest.raises(PrepError, match="is a BUTD checkpoint .*use --model butd-r101"):
        VinvlDetector(DetectorSpec(model="vinvl-x152c4", weights=str(butd)))
    path, _ = released_ckpt
    with pytest.raises(PrepError, match="is a VinVL checkpoint .*use --model vinvl-x152c4"):
        ButdDetector(DetectorSpec(model="butd-r101", weights=str(path)))


def test_wrong_model_refusal_is_one_error_line_from_the_cli(released_ckpt, tmp_path):
    path, _ = released_ckpt
    from PIL import Image
    (tmp_path / "im").mkdir()
    Image.fromarray(image(0)).save(tmp_path / "im" / "a.png")
    proc = subprocess.run([sys.executable, "-m", "teranprep", "extract-regions", str(tmp_path / "im"),
                           str(tmp_path / "f"), "--model", "butd-r101", "--weights", str(path), "--workers", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "is a VinVL checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_label_map_reads_names_by_model_index_and_refuses_a_bad_file(tmp_path):
    from teranprep.extractors.vinvl.checkpoint import check_label_map, read_label_map
    good = {"label_to_idx": {"cat": 1, "dog": 2}, "idx_to_label": {"2": "dog", "1": "cat"},
            "attribute_to_idx": {"red": 1}, "idx_to_attribute": {"1": "red"}}
    (tmp_path / "m.json").write_text(json.dumps(good))
    classes, attrs = read_label_map(tmp_path / "m.json")
    assert classes == ["__background__", "cat", "dog"] and attrs == ["__no_attribute__", "red"]
    with pytest.raises(PrepError, match="3 classes / 2 attributes, the weights 1595 / 525"):
        check_label_map(classes, attrs, 1595, 525, "m.json")
    (tmp_path / "bad.json").write_text(json.dumps({"idx_to_label": {"1": "a", "3": "c"}, "idx_to_attribute": {}}))
    with pytest.raises(PrepError, match="not a VinVL label map"):
        read_label_map(tmp_path / "bad.json")


def test_spatial_appends_the_six_geometry_values_by_hand():
    boxes = np.array([[10, 20, 110, 70], [0, 0, 200, 100]], np.float32)
    geo = box_geometry(boxes, width=200, height=100)
    np.testing.assert_allclose(geo, [[0.05, 0.2, 0.55, 0.7, 0.5, 0.5], [0, 0, 1, 1, 1, 1]], rtol=1e-6)
    plain = VinvlDetector(DetectorSpec(model="vinvl-tiny", random_seed=3))
    spatial = VinvlDetector(DetectorSpec(model="vinvl-tiny", random_seed=3, options=(("spatial", True),)))
    assert (plain.feature_dim, spatial.feature_dim) == (256, 262)
    a, b = plain.detect([image(3)])[0], spatial.detect([image(3)])[0]
    np.testing.assert_array_equal(b.features[:, :256], a.features)
    w, h = 120, 90
    x1, y1, x2, y2 = a.boxes.T
    np.testing.assert_allclose(b.features[:, 256:], np.stack([x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) / w,
                                                              (y2 - y1) / h], 1), rtol=1e-6)


def test_selection_is_the_per_class_loop_of_the_reference():
    """select_detections against a plain transcription of filter_results (NMS_FILTER 0)."""
    from torchvision.ops import box_iou
    from teranprep.extractors.vinvl.ops import select_detections
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(60, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 10 + torch.rand(60, 2, generator=g) * 40], 1)
    probs = torch.softmax(torch.randn(60, 6, generator=g) * 2, 1)
    rows = []
    for j in range(1, 6):
        cand = [i for i in range(60) if probs[i, j] > 0.2]
        cand.sort(key=lambda i: -probs[i, j].item())
        kept = []
        for i in cand:  # greedy, IoU > 0.5 suppresses (torchvision's, widths x2 - x1)
            if all(box_iou(boxes[[i]], boxes[[k]]).item() <= 0.5 for k in kept):
                kept.append(i)
        rows += [(i, j, probs[i, j].item()) for i in kept]
    scores = sorted(s for _, _, s in rows)
    cut = scores[len(rows) - 20] if len(rows) > 20 else -1
    want = [(i, j) for i, j, s in rows if s >= cut]
    idx, labels, got_scores = select_detections(boxes, probs, 0.2, 0.5, 5, 20)
    assert list(zip(idx.tolist(), labels.tolist())) == want
    assert len(want) == 20


def test_too_few_detections_halve_the_threshold():
    from teranprep.extractors.vinvl.ops import select_detections
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 50, 10, 60]], dtype=torch.float32)
    probs = torch.tensor([[0.3, 0.7], [0.85, 0.15], [0.9, 0.1]])
    idx, labels, _ = select_detections(boxes, probs, 0.2, 0.5, 2, 100)  # 0.2 -> 0.1: two pass
    assert idx.tolist() == [0, 1] and labels.tolist() == [1, 1]


def test_given_boxes_keep_every_box_with_its_best_class(tiny):
    boxes = np.array([[5, 5, 60, 50], [30, 10, 110, 80], [0, 0, 119, 89]], np.float32)
    det = tiny.detect([image(4)], [boxes])[0]
    np.testing.assert_array_equal(det.boxes, boxes)
    assert det.features.shape == (3, 256) and (det.class_ids >= 0).all()
    assert ((det.attr_ids == -1) == (det.attr_scores == 0)).all()


def test_bf16_drift_on_the_same_boxes_is_bounded(tiny):
    """As BUTD's bf16 tests: trunks in bf16, selection fp32, features close on the same boxes."""
    ref = tiny.detect([image(5)])[0]
    bf = VinvlDetector(DetectorSpec(model="vinvl-tiny", random_seed=3, precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in bf.model.roi_heads.res5.parameters())
    assert all(p.dtype == torch.float32 for p in bf.model.roi_heads.box_predictor.parameters())
    own = bf.detect([image(5)])[0]
    assert np.isfinite(own.features).all() and 10 <= len(own.boxes) <= 100
    same = bf.detect([image(5)], [ref.boxes])[0]
    cos = (ref.features * same.features).sum(1) / (np.linalg.norm(ref.features, axis=1) * np.linalg.norm(same.features, axis=1))
    assert cos.min() > 0.99 and cos.mean() > 0.995


def test_grouped_roi_head_equals_one_image_at_a_time(tiny):
    images = [image(6), image(7, 70, 100)]
    single = [tiny.detect_group([im], [None])[0] for im in images]
    grouped = tiny.detect_group(images, [None, None], roi_chunk=None)  # CUDA's path, here on CPU
    for a, b in zip(single, grouped):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.class_ids, b.class_ids)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)


def run_cli(*args, env=None):
    from click.testing import CliRunner
    from teranprep.cli import main
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result, result.output + (getattr(result, "stderr", "") or "")


def test_weights_list_and_path_name_vinvl_and_its_label_map(tmp_path):
    from teranprep.extractors import registry
    env = {"TERANPREP_CACHE": str(tmp_path / "cache")}
    result, out = run_cli("weights", "list", env=env)
    assert result.exit_code == 0
    line = next(l for l in out.splitlines() if l.startswith("vinvl-vg-x152c4\t"))
    assert "vinvl-x152c4\tboxes 10..100\tmaskrcnn-benchmark\tabsent" in line and line.endswith("vinvl_vg_x152c4.pth")
    assert f"label map\t{tmp_path / 'cache' / 'VG-SGG-dicts-vgoi6-clipped.json'}" in out
    result, out = run_cli("weights", "path", "vinvl-vg-x152c4", env=env)
    assert out.strip() == str(tmp_path / "cache" / registry.WEIGHTS["vinvl-vg-x152c4"].filename)
    (tmp_path / "im").mkdir()
    from PIL import Image
    Image.fromarray(image(0)).save(tmp_path / "im" / "a.png")
    result, out = run_cli("extract-regions", tmp_path / "im", tmp_path / "f", "--model", "vinvl-vg-x152c4", env=env)
    assert result.exit_code == 2 and registry.WEIGHTS["vinvl-vg-x152c4"].url in out


def test_spatial_is_refused_for_a_butd_model(tmp_path):
    (tmp_path / "im").mkdir()
    from PIL import Image
    Image.fromarray(image(0)).save(tmp_path / "im" / "a.png")
    result, out = run_cli("extract-regions", tmp_path / "im", tmp_path / "f", "--model", "butd-tiny",
                          "--random-weights", "0", "--spatial")
    assert result.exit_code == 2 and "--spatial applies to the VinVL models" in out
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_max_class_selection_is_nms_filter_1_of_the_reference():
    """select_detections_max_class against a plain transcription of filter_results_peter."""
    from torchvision.ops import box_iou
    from teranprep.extractors.vinvl.ops import select_detections_max_class
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(40, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 10 + torch.rand(40, 2, generator=g) * 40], 1)
    probs = torch.softmax(torch.randn(40, 5, generator=g) * 2, 1)
    best = torch.zeros(40)
    label = torch.zeros(40, dtype=torch.long)
    for j in range(1, 5):
        kept = []
        for i in sorted(range(40), key=lambda i: -probs[i, j].item()):
            if all(box_iou(boxes[[i]], boxes[[k]]).item() <= 0.3 for k in kept):
                kept.append(i)
        for i in kept:
            if probs[i, j] > best[i]:
                best[i], label[i] = probs[i, j], j
    alive = [i for i in range(40) if best[i] > 0]
    alive.sort(key=lambda i: -best[i].item())
    n_pass = sum(best[i] >= 0.4 for i in alive)
    for lo, hi in ((3, 8), (12, 20)):
        want = alive[:min(max(n_pass, lo), hi)]
        idx, labels, scores = select_detections_max_class(probs, boxes, 0.4, lo, hi)
        assert idx.tolist() == want and labels.tolist() == [label[i].item() for i in want]
        assert len(set(idx.tolist())) == len(idx)  # one row per proposal


def test_max_class_selection_through_the_detector_is_best_first():
    det = VinvlDetector(DetectorSpec(model="vinvl-tiny", random_seed=3, options=(("selection", "max-class"),)))
    out = det.detect([image(8)])[0]
    assert 10 <= len(out.boxes) <= 100
    assert (np.diff(out.class_scores) <= 0).all()
    per_class = VinvlDetector(DetectorSpec(model="vinvl-tiny", random_seed=3)).detect([image(8)])[0]
    assert not (np.diff(per_class.class_scores) <= 0).all()  # class-major there: the two differ


def test_show_regions_draws_boxes_vinvl_keeps_inverted_by_under_a_pixel(tmp_path):
    """maskrcnn_benchmark decodes x2 = ctr + w/2 - 1 and keeps boxes whose w + 1 >= 0, so a VinVL
    box may have x2 < x1 by up to 1 px; show-regions must draw it, not fail."""
    from PIL import Image
    from teranprep.pipeline.extract import extract_regions
    from teranprep.pipeline.regions import show_regions
    (tmp_path / "im").mkdir()
    Image.fromarray(image(9)).save(tmp_path / "im" / "a.png")
    boxes = {"a.png": [[10, 10, 9.4, 30], [5, 5, 50, 40]]}
    extract_regions(tmp_path / "im", tmp_path / "f", model="vinvl-tiny", random_weights=0, workers=0,
                    given_boxes=boxes, echo=lambda *_: None)
    written = show_regions(tmp_path / "f", ["a.png"], tmp_path / "png")
    assert len(written) == 1 and written[0].is_file()
