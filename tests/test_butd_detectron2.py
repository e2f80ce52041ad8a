"""The optional detectron2 backend, checked against detectron2's own predictor and modules.

Runs only where detectron2 is importable (it is not on PyPI). The models are detectron2's stock
R50-C4 and R50-FPN configs narrowed (fewer channels, small input, 50 proposals) so the file runs
in seconds; the code path is the stock one. Weights are random, calibrated, saved at test time.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_images
from teranprep.errors import PrepError
from teranprep.extractors import MODELS, DetectorSpec

pytestmark = [pytest.mark.detectron2, pytest.mark.threads]

STOCK = {"c4": "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml",
         "fpn": "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"}


def test_detectron2_backend_without_detectron2_is_a_one_line_prep_error():
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is importable here")
    with pytest.raises(PrepError, match="detectron2"):
        MODELS["detectron2"](DetectorSpec(model="detectron2", weights="w.pkl", options=(("d2_config", "c.yaml"),)))


def stock_config(kind):
    """detectron2's stock config from the configs its package ships; without them (a wheel built
    without the source tree), detectron2's defaults plus the keys Base-RCNN-{C4,FPN}.yaml set."""
    import detectron2
    from detectron2.config import get_cfg
    cfg = get_cfg()
    # model_zoo.get_config_file needs pkg_resources, which new setuptools no longer ship
    path = Path(detectron2.__file__).parent / "model_zoo" / "configs" / STOCK[kind]
    if path.is_file():
        cfg.merge_from_file(str(path), allow_unsafe=False)
    elif kind == "c4":
        cfg.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
    else:
        cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
        cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
        cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
        cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN, cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 2000, 1000
        cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000, 1000
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
        cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
        cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
        cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.RESNETS.DEPTH = 50
    return cfg


def narrow(cfg):
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 16
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 200, 320
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 300, 50
    return cfg


class Setup:
    """A narrowed stock model: its YAML, a random checkpoint, a test image, and detectron2's own
    DefaultPredictor on the same files (built and loaded by detectron2 alone)."""

    def __init__(self, kind, tmp):
        from detectron2.engine import DefaultPredictor
        self.kind = kind
        self.cfg = narrow(stock_config(kind))
        self.config = tmp / f"{kind}.yaml"
        self.config.write_text(self.cfg.dump())
        seeded = MODELS["detectron2"](DetectorSpec(model="detectron2", random_seed=0,
                                                   options=(("d2_config", str(self.config)),)))
        self.image = np.random.default_rng(1).integers(0, 255, (90, 130, 3), dtype=np.uint8)
        self.image[20:60, 30:90] = (200, 40, 90)
        spread_predictions(seeded, self.image)
        self.state = {k: v.detach().clone() for k, v in seeded.model.state_dict().items()}
        self.weights = tmp / f"{kind}.pth"
        torch.save({"model": self.state}, self.weights)
        cfg = self.cfg.clone()
        cfg.MODEL.WEIGHTS = str(self.weights)
        self.predictor = DefaultPredictor(cfg)

    def detector(self, **policy):
        return MODELS["detectron2"](DetectorSpec(model="detectron2", weights=str(self.weights),
                                                 options=(("d2_config", str(self.config)),), **policy))

    def reference(self, score_thresh, topk):
        """detectron2's own inference (DefaultPredictor) at these test thresholds."""
        predictor = self.predictor.model.roi_heads.box_predictor
        predictor.test_score_thresh, predictor.test_topk_per_image = score_thresh, topk
        return self.predictor(self.image[:, :, ::-1])["instances"]  # it takes BGR

    @torch.no_grad()
    def direct_features(self, boxes):
        """detectron2's modules called here on `boxes` (original pixels): C4 ROIAlign on res4 ->
        res5 -> mean over the grid; FPN multi-level ROIAlign -> box head."""
        from detectron2.structures import Boxes
        model = self.predictor.model
        image = self.image[:, :, ::-1]
        resized = self.predictor.aug.get_transform(image).apply_image(image)
        batch = model.preprocess_image([{"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))}])
        maps = model.backbone(batch.tensor)
        nh, nw = resized.shape[:2]
        scale = torch.tensor([nw / 130, nh / 90] * 2)
        b = [Boxes(torch.as_tensor(boxes) * scale)]
        heads = model.roi_heads
        if self.kind == "c4":
            return heads.res5(heads.pooler([maps["res4"]], b)).mean(dim=[2, 3]).numpy()
        return heads.box_head(heads.box_pooler([maps[f] for f in ("p2", "p3", "p4", "p5")], b)).numpy()


@torch.no_grad()
def spread_predictions(detector, image):
    """Random heads saturate (objectness and class scores 0/1, deltas at their clamp: the RPN's
    proposals collapse onto one box); rescale their last layers to unit-scale logits and small
    deltas, so proposals vary, scores spread over (0, 1) and regressed boxes move a little."""
    model = detector.model
    batch = model.preprocess_image([detector.inputs(image)])
    feats = model.backbone(batch.tensor)
    rpn = model.proposal_generator
    hidden = rpn.rpn_head.conv(feats[rpn.in_features[0]])
    rms = float(hidden.pow(2).mean().sqrt()) * hidden.shape[1] ** 0.5
    rpn.rpn_head.objectness_logits.weight.normal_(0, 1.0 / rms)
    rpn.rpn_head.anchor_deltas.weight.normal_(0, 0.2 / rms)
    proposals, _ = rpn(batch, feats, None)
    x = detector.region_features(feats, proposals[0].proposal_boxes.tensor)
    rms = float(x.pow(2).mean().sqrt()) * x.shape[1] ** 0.5
    predictor = model.roi_heads.box_predictor
    predictor.cls_score.weight.normal_(0, 3.0 / rms)
    predictor.bbox_pred.weight.normal_(0, 0.3 / rms)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two threads on a shared 2-core machine run these small convolutions ~50x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["c4", "fpn"])
def setup(request, tmp_path_factory):
    pytest.importorskip("detectron2")
    built = Setup(request.param, tmp_path_factory.mktemp(request.param))
    model, det = built.predictor.model, built.detector()
    with torch.no_grad():
        batch = model.preprocess_image([det.inputs(built.image)])
        proposals, _ = model.proposal_generator(batch, model.backbone(batch.tensor), None)
    assert len(proposals[0]) >= 20  # enough candidates for the policy checks to mean something
    return built


def same_detections(ours, theirs):
    np.testing.assert_array_equal(ours.class_ids, theirs.pred_classes.numpy())
    np.testing.assert_allclose(ours.class_scores, theirs.scores.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.boxes, theirs.pred_boxes.tensor.numpy(), rtol=1e-5, atol=1e-3)


def close_features(actual, expected):
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


def test_kept_boxes_are_detectron2_inference_at_the_same_threshold(setup):
    everything = setup.reference(0.0, 100)
    scores = everything.scores.numpy()
    assert len(scores) > 12 and scores[0] < 0.999 and (np.diff(scores) <= 0).all()
    assert scores[5] > scores[6]
    conf = float(scores[5] + scores[6]) / 2  # six boxes pass, fewer than max, more than min
    out = setup.detector(conf_thresh=conf, min_boxes=2, max_boxes=20).detect([setup.image])[0]
    expected = setup.reference(conf, 20)
    assert len(expected) == 6
    same_detections(out, expected)
    assert (out.boxes[:, 2:] <= [130, 90]).all() and (out.boxes >= 0).all()


def test_max_boxes_keeps_detectron2s_best_and_min_boxes_fills_up_in_its_order(setup):
    top = setup.reference(0.0, 20)
    capped = setup.detector(conf_thresh=0.0, min_boxes=1, max_boxes=4).detect([setup.image])[0]
    same_detections(capped, top[:4])
    # nothing passes 0.999: the best 12 below it, as detectron2 ranks them after its NMS
    assert setup.reference(0.999, 20).scores.numel() == 0
    for k in (1, 12):
        filled = setup.detector(conf_thresh=0.999, min_boxes=k, max_boxes=20).detect([setup.image])[0]
        same_detections(filled, top[:k])


def test_features_are_detectron2s_modules_on_the_kept_regressed_boxes(setup):
    det = setup.detector(conf_thresh=0.0, min_boxes=1, max_boxes=8)
    out = det.detect([setup.image])[0]
    assert out.features.shape == (8, det.feature_dim)
    assert det.feature_dim == (512 if setup.kind == "c4" else 128)  # res5 width / FC_DIM
    # with the test above (boxes == detectron2's regressed pred_boxes), each feature is its box's
    close_features(out.features, setup.direct_features(out.boxes))


def test_given_boxes_get_the_features_detectron2_computes_for_them(setup):
    det = setup.detector(min_boxes=3, max_boxes=5)
    hand = np.array([[0, 0, 129, 89], [10.5, 5, 60, 40], [70, 30, 125, 88]], np.float32)
    out = det.detect([setup.image, setup.image], [hand, hand[1:]])
    np.testing.assert_array_equal(out[0].boxes, hand)
    assert out[0].class_ids is None
    close_features(out[0].features, setup.direct_features(hand))
    close_features(out[1].features, out[0].features[1:])
    found = det.detect([setup.image])[0]
    close_features(det.detect([setup.image], [found.boxes])[0].features, found.features)


def test_checkpoint_formats_load_safely_and_strictly(setup, tmp_path):
    if setup.kind != "c4":
        pytest.skip("loading does not depend on the architecture")
    hand = np.array([[10.5, 5, 60, 40]], np.float32)
    expected = setup.direct_features(hand)
    zoo = tmp_path / "zoo.pkl"  # detectron2 model-zoo format: pickled dict of numpy arrays
    zoo.write_bytes(pickle.dumps({"model": {k: v.numpy() for k, v in setup.state.items()},
                                  "__author__": "test"}))
    det = MODELS["detectron2"](DetectorSpec(model="detectron2", weights=str(zoo),
                                            options=(("d2_config", str(setup.config)),)))
    close_features(det.detect([setup.image], [hand])[0].features, expected)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": Evil(), "__author__": "x"}))
    with pytest.raises(PrepError, match="refused"):
        MODELS["detectron2"](DetectorSpec(model="detectron2", weights=str(evil),
                                          options=(("d2_config", str(setup.config)),)))
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in setup.state.items() if k != "roi_heads.box_predictor.cls_score.bias"}, missing)
    with pytest.raises(PrepError, match=r"missing: roi_heads\.box_predictor\.cls_score\.bias"):
        MODELS["detectron2"](DetectorSpec(model="detectron2", weights=str(missing),
                                          options=(("d2_config", str(setup.config)),)))
    unsafe_yaml, side_effect = tmp_path / "unsafe.yaml", tmp_path / "made-by-yaml"
    unsafe_yaml.write_text(f"OUTPUT_DIR: !!python/object/apply:os.mkdir ['{side_effect}']\n")
    with pytest.raises(PrepError, match="unsafe.yaml"):
        MODELS["detectron2"](DetectorSpec(model="detectron2", weights=str(setup.weights),
                                          options=(("d2_config", str(unsafe_yaml)),)))
    assert not side_effect.exists()  # parsed with yaml.safe_load, never executed


def test_extract_regions_with_detectron2_writes_features_verify_accepts(setup, tmp_path):
    from click.testing import CliRunner

    from teranprep.cli import main
    from teranprep.manifests import FeatureStore
    from teranprep.pipeline.common.images import read_image
    from teranprep.pipeline.verify import verify
    images = tmp_path / "images"
    keys = write_images(images, 3, size=(60, 80))
    out, config = tmp_path / "out", tmp_path / "model.yaml"
    config.write_text(setup.config.read_text())
    args = ["extract-regions", images, out, "--backend", "detectron2", "--d2-config", config,
            "--weights", setup.weights, "--workers", 0, "--device", "cpu", "--dtype", "float32",
            "--min-boxes", 2, "--max-boxes", 6, "--conf-thresh", 0.3, "--quiet"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    report = verify(out)
    assert report.ok, report.problems
    det = setup.detector(conf_thresh=0.3, min_boxes=2, max_boxes=6)
    with FeatureStore(out) as store:
        assert sorted(store.keys()) == keys
        for key in keys:
            regions = store[key]
            expected = det.detect([read_image(images / key)[0]])[0]
            assert 2 <= len(regions) <= 6
            np.testing.assert_allclose(regions.boxes, expected.boxes, atol=1e-3)
            np.testing.assert_array_equal(regions.class_ids, expected.class_ids)
            close_features(regions.features, expected.features)
    # the merged config is part of the run's parameters: the same file edited is not resumed
    edited = setup.cfg.clone()
    edited.INPUT.MIN_SIZE_TEST = 100
    config.write_text(edited.dump())
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and "--overwrite" in result.output, result.output
