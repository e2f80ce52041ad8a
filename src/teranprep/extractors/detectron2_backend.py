"""Optional backend running detectron2's own modules (C4 or FPN Faster R-CNN) from its config + weights.

detectron2 is not on PyPI: it is imported lazily here and only here. Region features are the
box head's pooled input for C4 (res5 output averaged, as `_shared_roi_transform` gives it) and
the box head's output for FPN, pooled on the boxes detectron2's own inference keeps (its regressed
boxes, so each saved feature describes its saved box); our shared
policy (box_policy.select_top) then applies --conf-thresh / --min-boxes / --max-boxes.
UNTESTED here (detectron2 could not be built on this machine); tests skip without detectron2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..manifests.atomic import sha256_file
from .base import Detections, DetectorSpec
from .box_policy import select_top


class Detectron2Detector:
    columns = ("class_ids", "class_scores")

    def __init__(self, spec: DetectorSpec):
        try:
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.data import transforms as T
            from detectron2.modeling import build_model
        except ImportError as exc:
            raise PrepError("--backend detectron2 needs detectron2 importable (it is not on PyPI: "
                            f"see its INSTALL.md); import failed: {exc}") from exc
        config = spec.option("d2_config")
        if not config or not spec.weights:
            raise PrepError("--backend detectron2 needs --d2-config CONFIG.yaml and --weights FILE")
        cfg = get_cfg()
        cfg.merge_from_file(config)
        cfg.MODEL.WEIGHTS = spec.weights
        cfg.MODEL.DEVICE = spec.device
        # keep every candidate detectron2 finds; our policy thresholds afterwards
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = float(spec.option("d2_nms", 0.5))
        cfg.MODEL.ROI_HEADS.DETECTIONS_PER_IMAGE = max(spec.max_boxes, 100)
        cfg.freeze()
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        DetectionCheckpointer(self.model).load(spec.weights)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.spec = spec
        self.name = "detectron2"
        self.device = torch.device(spec.device)
        self.weights_sha256 = sha256_file(Path(spec.weights))
        heads = self.model.roi_heads
        self.is_c4 = hasattr(heads, "_shared_roi_transform")
        self.feature_dim = (heads.res5[-1].out_channels if self.is_c4
                            else heads.box_head.output_shape.channels)

    def _inputs(self, image_rgb):
        image = image_rgb[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else image_rgb
        h, w = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
        return {"image": tensor, "height": h, "width": w}, (h, w), resized.shape[:2]

    def _pool(self, features, boxes):
        from detectron2.structures import Boxes
        heads = self.model.roi_heads
        maps = [features[f] for f in heads.in_features]
        if self.is_c4:
            return heads._shared_roi_transform(maps, [Boxes(b) for b in boxes]).mean(dim=[2, 3])
        return heads.box_head(heads.box_pooler(maps, [Boxes(b) for b in boxes]))

    @torch.no_grad()
    def detect(self, images, boxes=None):
        results = []
        for i, image in enumerate(images):
            inputs, (h, w), (nh, nw) = self._inputs(image)
            batch = self.model.preprocess_image([inputs])
            features = self.model.backbone(batch.tensor)
            to_resized = torch.tensor([nw / w, nh / h, nw / w, nh / h], device=self.device)
            if boxes is not None:
                given = torch.as_tensor(np.asarray(boxes[i], np.float32).reshape(-1, 4), device=self.device)
                feats = self._pool(features, [given * to_resized])
                results.append(Detections(given.cpu().numpy(), feats.float().cpu().numpy()))
                continue
            proposals, _ = self.model.proposal_generator(batch, features, None)
            heads = self.model.roi_heads
            pooled = self._pool(features, [p.proposal_boxes.tensor for p in proposals])
            predictions = heads.box_predictor(pooled)
            instances, _ = heads.box_predictor.inference(predictions, proposals)
            inst = instances[0]
            scores = inst.scores
            keep = select_top(scores, self.spec.conf_thresh, self.spec.min_boxes, self.spec.max_boxes)
            resized_boxes = inst.pred_boxes.tensor[keep]
            # pooled again on the saved (regressed) boxes: every saved feature describes its box
            feats = self._pool(features, [resized_boxes])
            results.append(Detections(
                boxes=(resized_boxes / to_resized).float().cpu().numpy().astype(np.float32),
                features=feats.float().cpu().numpy(),
                class_ids=inst.pred_classes[keep].cpu().numpy().astype(np.int32),
                class_scores=scores[keep].float().cpu().numpy()))
        return results
