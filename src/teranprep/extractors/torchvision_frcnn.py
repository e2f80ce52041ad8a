"""torchvision Faster R-CNN backends (R50-FPN, MobileNetV3-320-FPN) with box-head region features.

Selection: each proposal keeps its best non-background class and that class's regressed box;
class-wise NMS (0.5) removes duplicates; then the shared box policy keeps score >= conf_thresh,
at least min_boxes and at most max_boxes. Features are the box head's (TwoMLPHead, 1024-d)
output pooled on the kept boxes themselves, so every saved feature describes its saved box.

Precision bf16: the backbone (with FPN) and the box head run in bf16, channels-last; the RPN,
the box predictor, box decoding and NMS run in fp32 on fp32 copies of the feature maps, so which
boxes are kept is decided by fp32 arithmetic.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torchvision.ops import batched_nms

from .base import Detections, DetectorSpec
from .box_policy import select_top
from .calibration import calibrate_frozen_batchnorms, calibration_image, freeze_batchnorms
from ..errors import PrepError
from .weights import load_state_dict_file, state_dict_sha256

_BUILDERS = {
    "tv-frcnn-r50-fpn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "tv-frcnn-mbv3-320": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn,
}
NUM_CLASSES = 91  # COCO category ids 0..90, as torchvision's detection checkpoints use
DUPLICATE_NMS = 0.5


class TorchvisionFasterRCNN:
    columns = ("class_ids", "class_scores")

    def __init__(self, spec: DetectorSpec):
        self.name = spec.model
        self.spec = spec
        builder = _BUILDERS[spec.model]
        torch.manual_seed(spec.random_seed if spec.random_seed is not None else 0)
        model = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
        freeze_batchnorms(model)
        model.eval()
        if spec.weights:
            state = load_state_dict_file(spec.weights)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:  # a checkpoint of another model
                first = str(exc).strip().splitlines()[0][:200]
                raise PrepError(f"{spec.weights}: not a {spec.model} checkpoint ({first}); pass "
                                "weights of this model or choose the matching --model") from exc
            self.weights_sha256 = state_dict_sha256(spec.weights)
        elif spec.random_seed is not None:
            torch.manual_seed(spec.random_seed)
            image = calibration_image(spec.random_seed)
            calibrate_frozen_batchnorms(model, lambda: model.backbone(model.transform([image])[0].tensors))
            self.weights_sha256 = f"random-seed-{spec.random_seed}"
        else:
            raise ValueError("torchvision backend needs weights or a random seed")
        self.device = torch.device(spec.device)
        self.model = model.to(self.device).requires_grad_(False)
        self.precision = spec.precision
        self.compute_dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
        # channels-last for the conv trunk in both precisions: oneDNN's faster layout on CPU
        model.backbone.to(dtype=self.compute_dtype, memory_format=torch.channels_last)
        model.roi_heads.box_head.to(dtype=self.compute_dtype)
        self.feature_dim = model.roi_heads.box_head.fc7.out_features

    def _features(self, tensors):
        fmaps = self.model.backbone(tensors.to(self.compute_dtype, memory_format=torch.channels_last))
        return type(fmaps)((k, v.float().contiguous()) for k, v in fmaps.items())

    def _box_head(self, pooled):
        return self.model.roi_heads.box_head(pooled.to(self.compute_dtype)).float()

    @torch.inference_mode()
    def detect(self, images, boxes=None):
        model = self.model
        tensors = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().to(self.device)
                   for im in images]
        original_sizes = [tuple(t.shape[-2:]) for t in tensors]
        batch, _ = model.transform(tensors)
        fmaps = self._features(batch.tensors)
        heads = model.roi_heads
        results = []
        if boxes is not None:
            scaled = [self._to_resized(torch.as_tensor(b, dtype=torch.float32, device=self.device),
                                       orig, new) for b, orig, new in
                      zip(boxes, original_sizes, batch.image_sizes)]
            feats = self._box_head(heads.box_roi_pool(fmaps, scaled, batch.image_sizes))
            for b, chunk in zip(boxes, feats.split([len(b) for b in boxes])):
                results.append(Detections(np.asarray(b, np.float32).reshape(-1, 4),
                                          chunk.float().cpu().numpy()))
            return results
        proposals, _ = model.rpn(batch, fmaps)
        logits, deltas = heads.box_predictor(self._box_head(heads.box_roi_pool(fmaps, proposals,
                                                                                batch.image_sizes)))
        decoded = heads.box_coder.decode(deltas, proposals).view(logits.shape[0], -1, 4)
        probs = torch.softmax(logits, -1)
        kept_boxes, kept_scores, kept_labels = [], [], []
        for props, pr, dec, size in zip(proposals, probs.split([len(p) for p in proposals]),
                                        decoded.split([len(p) for p in proposals]), batch.image_sizes):
            score, label = pr[:, 1:].max(dim=1)
            label = label + 1
            box = dec[torch.arange(len(label)), label]
            box = torchvision.ops.clip_boxes_to_image(box, size)
            keep = batched_nms(box, score, label, DUPLICATE_NMS)
            keep = keep[select_top(score[keep], self.spec.conf_thresh, self.spec.min_boxes,
                                   self.spec.max_boxes)]
            kept_boxes.append(box[keep]), kept_scores.append(score[keep]), kept_labels.append(label[keep])
        feats = self._box_head(heads.box_roi_pool(fmaps, kept_boxes, batch.image_sizes))
        for box, score, label, chunk, orig, new in zip(kept_boxes, kept_scores, kept_labels,
                                                      feats.split([len(b) for b in kept_boxes]),
                                                      original_sizes, batch.image_sizes):
            results.append(Detections(
                boxes=self._to_original(box, orig, new).cpu().numpy().astype(np.float32),
                features=chunk.float().cpu().numpy(),
                class_ids=label.cpu().numpy().astype(np.int32),
                class_scores=score.float().cpu().numpy()))
        return results

    @staticmethod
    def _to_original(box, orig, new):
        ratio = torch.tensor([orig[1] / new[1], orig[0] / new[0]] * 2, device=box.device)
        return box * ratio

    @staticmethod
    def _to_resized(box, orig, new):
        ratio = torch.tensor([new[1] / orig[1], new[0] / orig[0]] * 2, device=box.device)
        return box.reshape(-1, 4) * ratio
