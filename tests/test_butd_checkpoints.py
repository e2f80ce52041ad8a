"""Checkpoint formats on synthetic files with the real key names: MILVLG .pth, py-bua .pkl, detectron2 zoo."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from teranprep.errors import PrepError
from teranprep.extractors.base import DetectorSpec
from teranprep.extractors.butd.config import get_config
from teranprep.extractors.butd.detector import ButdDetector
from teranprep.extractors.butd.model import ButdModel
from teranprep.extractors.checkpoints import (ANCHORS_KEY, check_state_dict, convert_checkpoint,
                                              read_butd_checkpoint, read_checkpoint_file)

pytestmark = pytest.mark.threads  # bit-equal comparisons within one thread count

PRED = "roi_heads.box_predictor"
OBJ = "proposal_generator.rpn_head.objectness_logits"


def random_state(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sd = ButdModel(cfg).state_dict()
    out = {}
    for k, v in sd.items():
        if k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k == ANCHORS_KEY:
            out[k] = v.clone()
        else:
            out[k] = torch.randn(v.shape, generator=gen) * 0.05
    return out


def image(seed=0, h=90, w=120):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_state():
    return random_state(get_config("butd-tiny", post_nms_topk=20))


def detect_with(spec_model, path=None, sd=None):
    cfg = get_config("butd-tiny", post_nms_topk=20)
    spec = DetectorSpec(model=spec_model, weights=str(path) if path else None)
    det = ButdDetector(spec, cfg=cfg, state_dict=sd)
    return det, det.detect([image()])[0]


@pytest.mark.parametrize("wrapped", [True, False])
def test_milvlg_pth_loads_as_is_and_detects_like_the_in_memory_weights(tmp_path, tiny_state, wrapped):
    path = tmp_path / "bua-caffe-frcn-tiny.pth"
    torch.save({"model": tiny_state} if wrapped else tiny_state, path)
    det, ours = detect_with("butd-tiny", path=path)
    _, ref = detect_with("butd-tiny", sd=tiny_state)
    assert det.weights_format == "milvlg"
    np.testing.assert_array_equal(ours.features, ref.features)
    np.testing.assert_array_equal(ours.boxes, ref.boxes)


def to_py_bua(sd):
    """What py-bottom-up-attention's .pkl holds: sigmoid RPN, its attribute names, no anchors, numpy."""
    out = {}
    a = sd[f"{OBJ}.weight"].shape[0] // 2
    for k, v in sd.items():
        if k == ANCHORS_KEY:
            continue
        if k.startswith(OBJ):
            v = v[a:] - v[:a]  # the foreground-minus-background logit is the sigmoid logit
        k = (k.replace(".cls_embed.", ".cls_embedding.").replace(".attr_linear1.", ".fc_attr.")
             .replace(".attr_linear2.", ".attr_score."))
        out[k] = v.numpy()
    return out


def test_py_bua_pkl_renames_the_attribute_head_and_turns_sigmoid_into_softmax(tmp_path, tiny_state):
    raw = to_py_bua(tiny_state)
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    path.write_bytes(pickle.dumps({"model": raw, "__author__": "py-bua"}))
    sd, overrides, fmt, sha = read_butd_checkpoint(path)
    assert fmt == "py-bua" and len(sha) == 64
    assert torch.equal(sd[f"{PRED}.attr_linear1.weight"], torch.from_numpy(raw[f"{PRED}.fc_attr.weight"]))
    assert torch.equal(sd[f"{PRED}.cls_embed.weight"], torch.from_numpy(raw[f"{PRED}.cls_embedding.weight"]))
    # detectron2 cell anchors: size 64 ratio 0.5 -> w = sqrt(64^2 / 0.5), h = w / 2, centred at 0
    w = (64 * 64 / 0.5) ** 0.5
    assert sd[ANCHORS_KEY][0].tolist() == pytest.approx([-w / 2, -w / 4, w / 2, w / 4])
    assert sd[ANCHORS_KEY][1].tolist() == pytest.approx([-32, -32, 32, 32])
    # the loaded RPN's foreground probability equals sigmoid of the file's logit
    cfg = get_config("butd-tiny", **overrides)
    model = ButdModel(cfg).eval()
    model.load_state_dict(sd)
    fmap = torch.randn(1, cfg.stage_out(4), 3, 4)
    with torch.no_grad():
        fg = torch.softmax(model.rpn_raw(fmap).objectness_logits, 1)[:, 1]
        t = torch.relu(model.proposal_generator.rpn_head.conv(fmap))
        direct = torch.sigmoid(torch.nn.functional.conv2d(t, torch.from_numpy(raw[f"{OBJ}.weight"]),
                                                          torch.from_numpy(raw[f"{OBJ}.bias"])))
    np.testing.assert_allclose(fg.numpy(), direct[0].permute(1, 2, 0).reshape(-1).numpy(), atol=1e-6)


def test_detectron2_zoo_c4_pkl_maps_heads_and_sets_its_architecture(tmp_path):
    cfg = get_config("butd-tiny", num_classes=81, num_attrs=0)
    full = random_state(cfg)
    zoo = {}
    for k, v in full.items():
        if k == ANCHORS_KEY or k.startswith("proposal_generator.rpn_head.") and "conv" not in k:
            continue
        if k.startswith(f"{PRED}.bbox_pred"):
            v = v[4:]  # detectron2 regresses the 80 foreground classes only
        zoo[k] = v.numpy()
    zoo[f"{OBJ}.weight"] = np.random.default_rng(0).normal(0, .01, (15, 64, 1, 1)).astype(np.float32)
    zoo[f"{OBJ}.bias"] = np.zeros(15, np.float32)
    zoo["proposal_generator.rpn_head.anchor_deltas.weight"] = np.zeros((60, 64, 1, 1), np.float32)
    zoo["proposal_generator.rpn_head.anchor_deltas.bias"] = np.zeros(60, np.float32)
    path = tmp_path / "model_final_298dad.pkl"
    path.write_bytes(pickle.dumps({"model": zoo, "__author__": "Detectron2 Model Zoo"}))
    sd, overrides, fmt, _ = read_butd_checkpoint(path)
    assert fmt == "d2-zoo"
    assert overrides["num_classes"] == 81 and overrides["num_attrs"] == 0
    assert (overrides["res5_stride"], overrides["res5_dilation"]) == (2, 1)
    assert sd[f"{PRED}.bbox_pred.weight"].shape[0] == 4 * 81
    assert not sd[f"{PRED}.bbox_pred.weight"][:4].any()
    assert torch.equal(sd[f"{PRED}.bbox_pred.weight"][4:], torch.from_numpy(zoo[f"{PRED}.bbox_pred.weight"]))
    assert sd[ANCHORS_KEY].shape == (15, 4) and sd[f"{OBJ}.weight"].shape[0] == 30
    assert overrides["stage_blocks"] == (1, 1, 1) and overrides["res2_bottleneck"] == 8
    # its depth comes from the keys: the same file loads whichever BUTD architecture is named
    det = ButdDetector(DetectorSpec(model="butd-r101", weights=str(path)))
    out = det.detect([image()])[0]
    assert out.features.shape[1] == cfg.feature_dim and det.columns == ("class_ids", "class_scores")


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(PrepError, match="refused pickled global"):
        read_checkpoint_file(path)
    assert not marker.exists()


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path, tiny_state):
    sd = dict(tiny_state)
    sd.pop("backbone.res3.0.conv2.norm.running_mean")
    sd["roi_heads.box_predictor.extra.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(PrepError) as err:
        ButdDetector(DetectorSpec(model="butd-tiny", weights=str(path)))
    assert "backbone.res3.0.conv2.norm.running_mean" in str(err.value)
    assert "roi_heads.box_predictor.extra.weight" in str(err.value)
    # non-strict loads and reports the same names
    det = ButdDetector(DetectorSpec(model="butd-tiny", weights=str(path), options=(("strict", False),)))
    assert any("running_mean" in w for w in det.load_warnings)
    sd = dict(tiny_state)
    sd["backbone.res2.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, path)
    with pytest.raises(PrepError, match=r"wrong shape .*backbone\.res2\.0\.conv1\.weight"):
        ButdDetector(DetectorSpec(model="butd-tiny", weights=str(path), options=(("strict", False),)))


def test_fullsize_key_set_is_the_published_536_tensors_and_accepts_py_bua_names():
    with torch.device("meta"):
        model = ButdModel(get_config("butd-r101"))
    sd = model.state_dict()
    assert len(sd) == 536
    shapes = {f"{PRED}.cls_score.weight": (1601, 2048), f"{PRED}.bbox_pred.weight": (6404, 2048),
              f"{PRED}.cls_embed.weight": (1601, 256), f"{PRED}.attr_linear1.weight": (512, 2304),
              f"{PRED}.attr_linear2.weight": (401, 512), f"{OBJ}.weight": (24, 512, 1, 1),
              ANCHORS_KEY: (12, 4), "backbone.res4.22.conv3.norm.running_var": (1024,),
              "roi_heads.res5.0.shortcut.weight": (2048, 1024, 1, 1), "backbone.stem.conv1.weight": (64, 3, 7, 7)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # a full-size py-bua key set (shapes only, on the meta device) converts onto exactly this model
    raw = {}
    for k, v in sd.items():
        if k == ANCHORS_KEY:
            continue
        if k.startswith(OBJ):
            v = v[:12]
        k = (k.replace(".cls_embed.", ".cls_embedding.").replace(".attr_linear1.", ".fc_attr.")
             .replace(".attr_linear2.", ".attr_score."))
        raw[k] = torch.empty(v.shape, device="meta")
    converted, overrides, fmt = convert_checkpoint(raw)
    assert fmt == "py-bua" and overrides["num_classes"] == 1601 and overrides["num_attrs"] == 401
    converted[ANCHORS_KEY] = converted[ANCHORS_KEY].to("meta")
    assert check_state_dict(model, converted, "full-size py-bua") == []
