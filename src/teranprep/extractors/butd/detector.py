"""BUTD behind the Detector interface: weights (checkpoint or calibrated random), detect, given boxes.

Per image (batching would zero-pad images to a common size and change border features):
preprocess -> backbone -> RPN proposals; then ROI pooling + the ROI head (res5 + predictors),
ROI_CHUNK proposals at a time (on CUDA over all images of a batch at once) -> each image's Caffe
box policy.
Precision (spec.precision): ButdModel.for_inference; selection arithmetic is fp32 in both.
Saved boxes are the proposals (clipped, scaled back to original pixels) as in the Caffe tool and
MILVLG; spec option ("box_source", "regressed") saves instead each kept proposal's box regressed
for its top class (what py-bottom-up-attention saves; features stay those of the proposal).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..base import Detections, DetectorSpec
from ..box_policy import per_class_nms_max_conf, select_caffe
from ..calibration import calibrate_frozen_batchnorms, calibration_image
from .config import ButdConfig, get_config
from .model import ButdModel, HeadOutputs
from .ops import clip_boxes, decode_boxes, preprocess


def init_random(model: ButdModel, seed: int) -> None:
    """Deterministic random weights whose activations stay O(1): seeded init, then every frozen
    batch norm set from its own input statistics on a fixed calibration image (calibration.py)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                std = (2.0 / fan_in) ** 0.5 if name.startswith(("backbone", "roi_heads.res5")) else 0.01
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif not name.endswith("norm.weight"):
                p.zero_()
    image = calibration_image(seed).permute(1, 2, 0).numpy().astype(np.uint8)
    cfg = model.cfg

    def forward():
        x, _ = preprocess(image, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
        res4 = model.backbone(x)
        h, w = x.shape[-2:]
        # a fixed grid of boxes calibrates the res5 batch norms on realistic pooled inputs
        ys, xs = torch.meshgrid(torch.linspace(0, h * 0.6, 4), torch.linspace(0, w * 0.6, 4), indexing="ij")
        grid = torch.stack([xs, ys, xs + w * 0.35, ys + h * 0.35], -1).reshape(-1, 4)
        model.box_features(res4, grid)

    calibrate_frozen_batchnorms(model, forward)


# res5 runs on this many proposals at a time: bounds peak memory (16 x 2048 x 14 x 14 fp32 is
# 26 MB a tensor instead of 480 MB for 300 proposals) and keeps every activation under glibc's
# 32 MB mmap ceiling, so freed blocks are reused instead of faulting in fresh pages (at 50 a
# chunk, page faults cost as much as the bias, ReLU and residual passes together). A constant,
# so results never depend on the machine or the worker count.
ROI_CHUNK = 16

# Names the inference arithmetic (what rounding the features carry). It joins extract-regions'
# parameter fingerprint, so a folder started by code that rounded differently (norms unfolded in
# fp32, unfused convs, chunks of 50) is not silently resumed with features of two kinds.
INFERENCE = "folded-norms+onednn-fused-convs+roi-chunks-16"


def _slice(head: HeadOutputs, a: int, b: int) -> HeadOutputs:
    return HeadOutputs(*(None if t is None else t[a:b] for t in
                         (head.features, head.class_logits, head.box_deltas, head.attr_logits)))


class ButdDetector:
    def __init__(self, spec: DetectorSpec, cfg: ButdConfig | None = None, state_dict: dict | None = None):
        from dataclasses import replace

        from ..checkpoints import load_into, read_butd_checkpoint
        self.spec = spec
        self.name = spec.model
        cfg = cfg or get_config(spec.model)
        torch.manual_seed(spec.random_seed if spec.random_seed is not None else 0)
        self.load_warnings = []
        if state_dict is not None:
            model = ButdModel(cfg).eval()
            model.load_state_dict(state_dict, strict=True)
            self.weights_sha256 = "in-memory"
        elif spec.weights:
            sd, overrides, self.weights_format, self.weights_sha256 = read_butd_checkpoint(spec.weights)
            cfg = replace(cfg, **overrides)  # class/attribute counts and anchors come from the weights
            model = ButdModel(cfg).eval()
            self.load_warnings = load_into(model, sd, spec.weights, strict=spec.option("strict", True))
        elif spec.random_seed is not None:
            model = ButdModel(cfg).eval()
            init_random(model, spec.random_seed)
            self.weights_sha256 = f"random-seed-{spec.random_seed}"
        else:
            raise ValueError("BUTD needs weights or a random seed")
        self.cfg = cfg
        self.device = torch.device(spec.device)
        self.precision = spec.precision
        self.model = model.to(self.device).for_inference(
            spec.precision, channels_last=True, merge_shortcuts=spec.option("merge_shortcuts", False))
        self.feature_dim = self.cfg.feature_dim
        self.columns = ("class_ids", "class_scores") + (
            ("attr_ids", "attr_scores") if self.cfg.num_attrs > 0 else ())
        self.box_source = spec.option("box_source", "proposals")
        if self.box_source not in ("proposals", "regressed"):
            raise ValueError(f"box_source must be proposals or regressed, not {self.box_source!r}")
        self.timings = {"backbone_s": 0.0, "rpn_s": 0.0, "roi_head_s": 0.0, "selection_s": 0.0}

    @torch.inference_mode()
    def detect(self, images, boxes=None):
        """On CPU one image at a time; on CUDA the ROI head (res5 + predictors, 90% of the FLOPs)
        runs once over every image's proposals (the backbone stays per image: zero-padding to a
        common size would change border features). Each ROI is its own sample, so grouping
        changes no formula; tests check both paths agree on CPU."""
        givens = [None] * len(images) if boxes is None else list(boxes)
        if self.device.type == "cuda":
            return self.detect_group(images, givens, roi_chunk=None)
        return [self.detect_group([image], [given])[0] for image, given in zip(images, givens)]

    def detect_one(self, image: np.ndarray, given_boxes=None) -> Detections:
        return self.detect_group([image], [given_boxes])[0]

    def _tick(self, key, t0):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.timings[key] += t - t0
        return t

    @torch.inference_mode()
    def detect_group(self, images, givens, roi_chunk: int | None = ROI_CHUNK) -> list[Detections]:
        """Backbone + RPN per image, ROI pooling + res5 + predictors over all their ROIs
        (`roi_chunk` at a time), then each image's selection."""
        model = self.model
        prepared, parts = [], []
        for image, given_boxes in zip(images, givens):
            t = time.perf_counter()
            x, scale = self._prepare(image)
            x = x.to(self.device)
            res4 = model.backbone(x)
            t = self._tick("backbone_s", t)
            h, w = x.shape[-2:]
            if given_boxes is not None:
                given = torch.as_tensor(np.asarray(given_boxes, np.float32).reshape(-1, 4), device=self.device)
                rois = self._to_input(given, scale)
            else:
                given = None
                rois, _ = model.proposals(model.rpn_raw(res4), (h, w), scale)
                t = self._tick("rpn_s", t)
            parts.append((res4, rois))  # res4 (~5 MB) is pooled chunk by chunk, not all at once
            del x
            prepared.append((given, rois, h, w, scale))
        t = time.perf_counter()
        head = model.head_outputs_of(model.roi_features(parts, roi_chunk),
                                     deltas=self.box_source == "regressed")
        del parts
        t = self._tick("roi_head_s", t)
        out, start = [], 0
        for given, rois, h, w, scale in prepared:
            part = _slice(head, start, start + len(rois))
            start += len(rois)
            out.append(self._select(part, given, rois, h, w, scale))
        return out

    def _prepare(self, image):
        """-> (input tensor (1, 3, H', W'), the resize as _to_input and _select read it)."""
        cfg = self.cfg
        return preprocess(image, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)

    def _to_input(self, given, scale):
        return given * scale

    def _select(self, head, given, proposals, h, w, scale) -> Detections:
        cfg = self.cfg
        if given is not None:
            return self._detections(given, head, torch.arange(len(given), device=self.device))
        t = time.perf_counter()
        dets = clip_boxes(proposals, h, w) / scale
        probs = torch.softmax(head.class_logits.float(), dim=1)
        max_conf = per_class_nms_max_conf(dets, probs[:, 1:], cfg.class_nms)
        keep = select_caffe(max_conf, self.spec.conf_thresh, self.spec.min_boxes, self.spec.max_boxes)
        self._tick("selection_s", t)
        if self.box_source == "regressed":
            label = probs[keep, 1:].argmax(dim=1) + 1
            deltas = head.box_deltas[keep].view(len(keep), -1, 4)[torch.arange(len(keep)), label]
            saved = clip_boxes(decode_boxes(deltas, proposals[keep], cfg.bbox_reg_weights,
                                            cfg.scale_clamp), h, w) / scale
        else:
            saved = dets[keep]
        return self._detections(saved, head, keep)

    def _detections(self, saved_boxes, head, keep) -> Detections:
        probs = torch.softmax(head.class_logits[keep].float(), dim=1)[:, 1:]
        cls_score, cls_id = probs.max(dim=1) if probs.shape[1] else (None, None)
        det = Detections(boxes=saved_boxes.float().cpu().numpy().astype(np.float32).reshape(-1, 4),
                         features=head.features[keep].float().cpu().numpy(),
                         class_ids=cls_id.cpu().numpy().astype(np.int32),
                         class_scores=cls_score.cpu().numpy().astype(np.float32))
        if head.attr_logits is not None:
            attr = torch.softmax(head.attr_logits[keep].float(), dim=1)[:, 1:]
            a_score, a_id = attr.max(dim=1)
            det.attr_ids = a_id.cpu().numpy().astype(np.int32)
            det.attr_scores = a_score.cpu().numpy().astype(np.float32)
        return det
