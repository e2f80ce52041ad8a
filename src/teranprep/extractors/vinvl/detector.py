"""VinVL behind the Detector interface: BUTD's detector loop (butd.detector.ButdDetector: per-image
backbone + RPN, ROI head in chunks or, on CUDA, over a batch) with VinVL's preprocessing,
selection and attributes.

Selection is scene_graph_benchmark's test-time path with VinVL's extraction settings: per-class
NMS over the proposals' class scores (a proposal may be kept for several classes; option
("selection", "max-class") is NMS_FILTER 1 instead: one row per proposal, best first), 10..100
detections, the proposals' own boxes (IGNORE_BOX_REGRESSION), each with the features of its
proposal; attributes from the attribute head fed the detected label. Stored per region: the
class id (0-based foreground: label - 1), its score, the top attribute (0-based, -1 when no
attribute scores above 0.05) and its score. spec option ("spatial", True) appends VinVL's 6
box-geometry values to each feature (2054-d, the released files' layout).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..base import Detections, DetectorSpec
from ..butd.detector import ButdDetector
from ..calibration import calibrate_frozen_batchnorms, calibration_image
from .config import VinvlConfig, get_config
from .model import VinvlModel
from .ops import (preprocess, scale_to_original, select_attributes, select_detections,
                  select_detections_max_class)

# joins extract-regions' parameter fingerprint (as butd.detector.INFERENCE)
INFERENCE = "vinvl:folded-norms+onednn-fused-convs+roi-chunks-16+roialign-fp32"
# per-class: the yaml's MODEL.ROI_HEADS.NMS_FILTER 0 (default; what the parity test pins);
# max-class: NMS_FILTER 1, the command scene_graph_benchmark's README gives for Oscar's features
SELECTIONS = ("per-class", "max-class")
SPATIAL_DIM = 6


def box_geometry(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """VinVL's 6 spatial values per box: x1/W, y1/H, x2/W, y2/H, w/W, h/H (w = x2 - x1)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    w, h = np.float32(width), np.float32(height)
    return np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h,
                     (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], axis=1).astype(np.float32)


def init_random(model: VinvlModel, seed: int) -> None:
    """Seeded random weights kept O(1) by calibrating the frozen norms (as BUTD's init_random)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                std = (2.0 / fan_in) ** 0.5 if name.startswith(("backbone", "roi_heads.res5")) else 0.05
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif not name.endswith("norm.weight"):
                p.zero_()
        # the frozen norms have eps 0: calibrated variances are > 0, so rsqrt stays finite
    image = calibration_image(seed).permute(1, 2, 0).numpy().astype(np.uint8)
    cfg = model.cfg

    def forward():
        x = preprocess(image, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        res4 = model.backbone(x)
        h, w = x.shape[-2:]
        ys, xs = torch.meshgrid(torch.linspace(0, h * 0.6, 4), torch.linspace(0, w * 0.6, 4), indexing="ij")
        grid = torch.stack([xs, ys, xs + w * 0.35, ys + h * 0.35], -1).reshape(-1, 4)
        model.box_features(res4, grid)

    calibrate_frozen_batchnorms(model, forward)


class VinvlDetector(ButdDetector):
    def __init__(self, spec: DetectorSpec, cfg: VinvlConfig | None = None, state_dict: dict | None = None):
        from .checkpoint import load_state, read_vinvl_checkpoint
        self.spec = spec
        self.name = spec.model
        cfg = cfg or get_config(spec.model)
        torch.manual_seed(spec.random_seed if spec.random_seed is not None else 0)
        self.load_warnings = []
        if state_dict is not None:
            model = VinvlModel(cfg).eval()
            model.load_state_dict(state_dict, strict=True)
            self.weights_sha256 = "in-memory"
        elif spec.weights:
            sd, unplaced, overrides, self.weights_sha256 = read_vinvl_checkpoint(spec.weights)
            cfg = replace(cfg, **overrides)
            model = VinvlModel(cfg).eval()
            self.load_warnings = load_state(model, sd, unplaced, spec.weights, strict=spec.option("strict", True))
            self.weights_format = "maskrcnn-benchmark"
        elif spec.random_seed is not None:
            model = VinvlModel(cfg).eval()
            init_random(model, spec.random_seed)
            self.weights_sha256 = f"random-seed-{spec.random_seed}"
        else:
            raise ValueError("VinVL needs weights or a random seed")
        self.cfg = cfg
        self.device = torch.device(spec.device)
        self.precision = spec.precision
        self.model = model.to(self.device).for_inference(
            spec.precision, channels_last=True, merge_shortcuts=spec.option("merge_shortcuts", False))
        self.spatial = bool(spec.option("spatial", False))
        self.feature_dim = cfg.feature_dim + (SPATIAL_DIM if self.spatial else 0)
        self.columns = ("class_ids", "class_scores", "attr_ids", "attr_scores")
        self.box_source = "proposals"
        self.selection = spec.option("selection", "per-class")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, not {self.selection!r}")
        self.timings = {"backbone_s": 0.0, "rpn_s": 0.0, "roi_head_s": 0.0, "selection_s": 0.0}

    def _prepare(self, image):
        cfg = self.cfg
        x = preprocess(image, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        return x, (tuple(image.shape[:2]), tuple(x.shape[-2:]))

    def _to_input(self, given, scale):
        (h, w), (h_in, w_in) = scale  # maskrcnn_benchmark's target.resize(input size): x and y apart
        return scale_to_original(given, (h, w), (h_in, w_in))

    def regions(self, head, proposals, given: bool):
        """-> (proposal rows, labels 1..C-1, scores, attr labels (R, 16), attr scores (R, 16)):
        what the reference outputs, in its order. Given boxes (FORCE_BOXES): every box, its best
        foreground class."""
        cfg = self.cfg
        probs = torch.softmax(head.class_logits.float(), dim=1)
        if given:
            scores, labels = probs[:, 1:].max(dim=1)
            idx, labels = torch.arange(len(probs), device=probs.device), labels + 1
        elif self.selection == "max-class":
            idx, labels, scores = select_detections_max_class(probs, proposals, self.spec.conf_thresh,
                                                              self.spec.min_boxes, self.spec.max_boxes)
        else:
            idx, labels, scores = select_detections(proposals, probs, self.spec.conf_thresh, cfg.class_nms,
                                                    self.spec.min_boxes, self.spec.max_boxes,
                                                    cfg.score_halvings)
        attr_logits = self.model.attr_logits(head.features[idx], labels)
        attr_labels, attr_scores = select_attributes(attr_logits, cfg.attr_thresh, cfg.attrs_per_image,
                                                     cfg.attrs_per_box)
        return idx, labels, scores, attr_labels, attr_scores

    def _select(self, head, given, proposals, h, w, scale) -> Detections:
        image_hw, input_hw = scale
        t = time.perf_counter()
        idx, labels, scores, attr_labels, attr_scores = self.regions(head, proposals, given is not None)
        self._tick("selection_s", t)
        boxes = given if given is not None else scale_to_original(proposals[idx], input_hw, image_hw)
        boxes = boxes.float().cpu().numpy().astype(np.float32).reshape(-1, 4)
        features = head.features[idx].float().cpu().numpy()
        if self.spatial:
            features = np.concatenate([features, box_geometry(boxes, image_hw[1], image_hw[0])], axis=1)
        top_attr = attr_scores[:, 0] if attr_scores.shape[1] else attr_scores.new_zeros(len(idx))
        top_id = torch.where(top_attr > 0, attr_labels[:, 0] - 1, torch.full_like(attr_labels[:, 0], -1)) \
            if attr_scores.shape[1] else torch.full((len(idx),), -1)
        return Detections(boxes=boxes, features=features,
                          class_ids=(labels - 1).cpu().numpy().astype(np.int32),
                          class_scores=scores.float().cpu().numpy().astype(np.float32),
                          attr_ids=top_id.cpu().numpy().astype(np.int32),
                          attr_scores=top_attr.float().cpu().numpy().astype(np.float32))


def feature_layout(spatial: bool) -> str:
    """What a feature row holds, recorded in the features manifest's parameters."""
    return ("res5-mean-2048+box-geometry-6 (x1/W, y1/H, x2/W, y2/H, w/W, h/H)" if spatial
            else "res5-mean-2048")
