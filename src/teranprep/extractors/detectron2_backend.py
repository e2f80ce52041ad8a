"""Optional backend running detectron2's own Faster R-CNN (C4 or FPN) from its YAML config + weights.

detectron2 is not on PyPI: it is imported lazily here and only here.

Detection is detectron2's own inference (`fast_rcnn_inference` + `detector_postprocess`, as
`GeneralizedRCNN.inference` runs it): per-class NMS at the config's NMS_THRESH_TEST over
(proposal, class) pairs, class-regressed boxes clipped to the image. Our shared policy then
applies --conf-thresh / --min-boxes / --max-boxes (box_policy.select_top): with enough boxes
above the threshold, the kept set is exactly what detectron2 returns with SCORE_THRESH_TEST =
conf-thresh and DETECTIONS_PER_IMAGE = max-boxes. Greedy NMS never lets a lower score suppress a
higher one, so lowering the score threshold only appends boxes: that is how the min-boxes
fill-up stays consistent with detectron2's own ranking without running NMS over every pair.

Region features are computed again on the kept (regressed) boxes, so each saved feature describes
its saved box: for C4 the res5 output of `_shared_roi_transform` averaged over its 7x7 grid (the
box predictor's input), for FPN the box head's output. Class ids are detectron2's contiguous
0-based foreground ids (no background slot). Images run one at a time: batching pads images,
and padding changes the features near the border.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..manifests.atomic import sha256_file
from .base import Detections, DetectorSpec
from .box_policy import select_top
from ..safe_torch import load_torch_file


def _import_detectron2():
    try:
        import detectron2  # noqa: F401
    except ImportError as exc:
        raise PrepError("--backend detectron2 needs detectron2 importable (it is not on PyPI: "
                        f"install it from source, see its INSTALL.md); import failed: {exc}") from exc


def _below(value: float) -> float:
    """The largest float32 below `value`: detectron2 keeps scores > thresh, our policy >= thresh."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def load_config(path):
    """A frozen-able detectron2 CfgNode from a yacs YAML file, parsed with yaml.safe_load only."""
    from detectron2.config import get_cfg
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: detectron2 config not found; pass an existing YAML file to --d2-config")
    if path.suffix == ".py":
        raise PrepError(f"{path}: LazyConfig (.py) configs are not supported; pass a YAML config "
                        "(e.g. COCO-Detection/faster_rcnn_R_50_C4_1x.yaml) to --d2-config")
    cfg = get_cfg()
    try:
        # allow_unsafe=False: detectron2 would otherwise fall back to yaml.unsafe_load
        cfg.merge_from_file(str(path), allow_unsafe=False)
    except Exception as exc:  # noqa: BLE001 - yacs raises KeyError/AssertionError/yaml errors alike
        detail = " ".join(str(exc).split())
        raise PrepError(f"{path}: not a usable detectron2 YAML config ({type(exc).__name__}: {detail}); "
                        "check the file and its _BASE_ chain (python/ YAML tags are refused: write "
                        "their values out)") from exc
    return cfg


def config_sha256(path) -> str:
    """sha256 of the merged config (its _BASE_ chain included), as detectron2 will build it."""
    _import_detectron2()
    import hashlib
    return hashlib.sha256(load_config(path).dump().encode()).hexdigest()


def _safe_checkpoint(path: str) -> dict:
    """What DetectionCheckpointer._load_file returns, read without executing pickled code."""
    if path.endswith(".pkl"):
        from ..safe_pickle import safe_load_file
        data = safe_load_file(path)
        if not isinstance(data, dict):
            raise PrepError(f"{path}: expected a pickled dict of arrays, found {type(data).__name__}")
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            return data
        # Caffe2 / Detectron1 model zoo: detectron2 renames these by its matching heuristics
        data = data.get("blobs", data)
        return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise PrepError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj if isinstance(obj.get("model"), dict) else {"model": obj}


def load_weights(model, path: str) -> None:
    """Loads `path` into `model` through detectron2's checkpointer (its renaming and legacy
    conversions), reading the file safely; any missing, unexpected or mis-shaped key is refused."""
    from detectron2.checkpoint import DetectionCheckpointer
    checkpointer = DetectionCheckpointer(model)
    incompatible = checkpointer._load_model(_safe_checkpoint(path))
    problems = [("missing", list(incompatible.missing_keys)),
                ("unexpected", list(incompatible.unexpected_keys)),
                ("mis-shaped", [k for k, *_ in incompatible.incorrect_shapes])]
    listed = "; ".join(f"{kind}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                       for kind, keys in problems if keys)
    if listed:
        raise PrepError(f"{path}: checkpoint does not match the --d2-config model ({listed}); "
                        "pass the config the weights were trained with")


class Detectron2Detector:
    columns = ("class_ids", "class_scores")

    def __init__(self, spec: DetectorSpec):
        _import_detectron2()
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model
        config = spec.option("d2_config")
        if not config:
            raise PrepError("--backend detectron2 needs --d2-config CONFIG.yaml (and --weights FILE)")
        if not spec.weights and spec.random_seed is None:
            raise PrepError("--backend detectron2 needs --weights FILE (or --random-weights SEED)")
        cfg = load_config(config)
        cfg.MODEL.DEVICE = spec.device
        cfg.MODEL.WEIGHTS = ""
        cfg.freeze()
        self.cfg = cfg
        if spec.random_seed is not None:
            torch.manual_seed(spec.random_seed)
        model = build_model(cfg).eval()
        heads = getattr(model, "roi_heads", None)
        predictor = getattr(heads, "box_predictor", None)
        if getattr(model, "proposal_generator", None) is None or not isinstance(predictor, torch.nn.Module) \
                or isinstance(predictor, torch.nn.ModuleList):
            raise PrepError(f"{config}: --backend detectron2 supports two-stage Faster R-CNN configs "
                            f"(C4 or FPN, one box head); this one builds {type(model).__name__} "
                            f"with {type(heads).__name__}")
        self.model = model
        self.is_c4 = hasattr(heads, "_shared_roi_transform")
        self.feature_dim = (heads.res5[-1].out_channels if self.is_c4
                            else heads.box_head.output_shape.channels)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.nms_thresh = float(cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST)
        self.spec = spec
        self.name = "detectron2"
        self.device = torch.device(spec.device)
        if spec.weights:
            load_weights(model, spec.weights)
            self.weights_sha256 = sha256_file(Path(spec.weights))
        else:
            self._calibrate(spec.random_seed)
            self.weights_sha256 = f"random-seed-{spec.random_seed}"

    @torch.no_grad()
    def _calibrate(self, seed: int) -> None:
        """Random weights: detectron2's frozen batch norms set from one fixed image (calibration.py)."""
        from detectron2.layers import FrozenBatchNorm2d
        from .calibration import calibrate_frozen_batchnorms, calibration_image
        image = calibration_image(seed).permute(1, 2, 0).to(torch.uint8).numpy()
        calibrate_frozen_batchnorms(self.model, lambda: self.model.inference([self.inputs(image)]),
                                    types=(FrozenBatchNorm2d,))

    def inputs(self, image_rgb: np.ndarray) -> dict:
        """detectron2's DefaultPredictor preprocessing: channel order, shortest-edge resize."""
        image = image_rgb[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else image_rgb
        h, w = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))
        return {"image": tensor, "height": h, "width": w}

    def region_features(self, features: dict, boxes: torch.Tensor) -> torch.Tensor:
        """(n, D) features of `boxes` (resized-image pixels): C4 res5 mean-pooled, FPN box head."""
        from detectron2.structures import Boxes
        heads = self.model.roi_heads
        maps = [features[f] for f in heads.in_features]
        if self.is_c4:
            return heads._shared_roi_transform(maps, [Boxes(boxes)]).mean(dim=[2, 3])
        return heads.box_head(heads.box_pooler(maps, [Boxes(boxes)]))

    def _inference(self, boxes, scores, image_size, score_thresh, h, w):
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
        inst, _ = fast_rcnn_inference_single_image(boxes, scores, image_size, score_thresh,
                                                   self.nms_thresh, self.spec.max_boxes)
        # detector_postprocess scales pred_boxes in place: keep the resized boxes for pooling
        inst.resized_boxes = inst.pred_boxes.tensor.clone()
        return detector_postprocess(inst, h, w)

    def _select(self, predictions, proposals, h, w):
        predictor = self.model.roi_heads.box_predictor
        boxes = predictor.predict_boxes(predictions, proposals)[0]
        scores = predictor.predict_probs(predictions, proposals)[0]
        size = proposals[0].image_size
        spec = self.spec
        inst = self._inference(boxes, scores, size, _below(spec.conf_thresh), h, w)
        foreground = scores[:, :-1].flatten()
        k = spec.min_boxes
        while len(inst) < spec.min_boxes:
            # too few above conf-thresh: admit the top-k (proposal, class) scores, k growing
            everything = k >= foreground.numel()
            thresh = -1.0 if everything else _below(float(torch.topk(foreground, k).values[-1]))
            inst = self._inference(boxes, scores, size, thresh, h, w)
            if everything:
                break
            k *= 4
        return inst[select_top(inst.scores, spec.conf_thresh, spec.min_boxes, spec.max_boxes)]

    @torch.no_grad()
    def detect(self, images, boxes=None):
        return [self._detect_one(image, None if boxes is None else boxes[i])
                for i, image in enumerate(images)]

    def _detect_one(self, image_rgb, given):
        model = self.model
        inputs = self.inputs(image_rgb)
        h, w = inputs["height"], inputs["width"]
        batch = model.preprocess_image([inputs])
        features = model.backbone(batch.tensor)
        nh, nw = batch.image_sizes[0]
        if given is not None:
            given = torch.as_tensor(np.asarray(given, np.float32).reshape(-1, 4))
            scale = torch.tensor([nw / w, nh / h, nw / w, nh / h])
            feats = self.region_features(features, (given * scale).to(self.device))
            return Detections(given.numpy(), feats.float().cpu().numpy())
        proposals, _ = model.proposal_generator(batch, features, None)
        pooled = self.region_features(features, proposals[0].proposal_boxes.tensor)
        inst = self._select(model.roi_heads.box_predictor(pooled), proposals, h, w)
        feats = self.region_features(features, inst.resized_boxes)
        return Detections(
            boxes=inst.pred_boxes.tensor.float().cpu().numpy().astype(np.float32),
            features=feats.float().cpu().numpy(),
            class_ids=inst.pred_classes.cpu().numpy().astype(np.int32),
            class_scores=inst.scores.float().cpu().numpy())
