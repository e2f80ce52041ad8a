"""The VinVL network as BUTD's pieces (butd.model) with maskrcnn_benchmark's differences.

Same as BUTD: folded frozen norms, oneDNN-fused convs (ConvNorm), bf16 conv trunks, ROI chunks
(`ButdModel.roi_features`), res5 mean -> 2048-d features. Different: ResNeXt bottlenecks (32
groups, stride in the 3x3 conv), norms without eps, a PyTorch stem pool (padding 1, floor),
sigmoid RPN (A logits) with maskrcnn_benchmark's proposal order, ROIAlign (legacy, not aligned)
instead of ROIPool, res5 with stride 2 (14x14 -> 7x7), and an attribute head fed the detected
label. Module names are BUTD's (backbone.res4.35.conv2.norm...); checkpoint.py maps the released
maskrcnn_benchmark names onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

from ..butd.model import Bottleneck, ButdModel, ConvNorm, RPNHead, RPNRaw, _BufferList, _channels_last
from ..butd.ops import caffe_cell_anchors, clip_boxes, grid_anchors
from .config import VinvlConfig
from .ops import decode_boxes


def make_stage(cfg: VinvlConfig, stage: int, blocks: int, cin: int, first_stride: int, dilation: int = 1):
    layers = []
    for i in range(blocks):
        layers.append(Bottleneck(cin, cfg.bottleneck(stage), cfg.stage_out(stage), first_stride if i == 0 else 1,
                                 dilation, cfg.stride_in_1x1, cfg.bn_eps, groups=cfg.num_groups))
        cin = cfg.stage_out(stage)
    return nn.Sequential(*layers)


class Stem(nn.Module):
    def __init__(self, cfg: VinvlConfig):
        super().__init__()
        self.conv1 = ConvNorm(3, cfg.stem_channels, 7, stride=2, padding=3, eps=cfg.bn_eps)

    def forward(self, x):
        # maskrcnn_benchmark's stem: nn.MaxPool2d(3, 2, padding=1), floor (BUTD/Caffe: no pad, ceil)
        return F.max_pool2d(self.conv1(x, relu=True), kernel_size=3, stride=2, padding=1)


class Backbone(nn.Module):
    """Stem + res2..res4: image (1, 3, H, W) -> res4 (1, 1024, ~H/16, ~W/16)."""

    def __init__(self, cfg: VinvlConfig):
        super().__init__()
        self.stem = Stem(cfg)
        self.res2 = make_stage(cfg, 2, cfg.stage_blocks[0], cfg.stem_channels, 1)
        self.res3 = make_stage(cfg, 3, cfg.stage_blocks[1], cfg.stage_out(2), 2)
        self.res4 = make_stage(cfg, 4, cfg.stage_blocks[2], cfg.stage_out(3), 2)

    def forward(self, x):
        w = self.stem.conv1.weight
        x = x.to(w.dtype, memory_format=torch.channels_last if _channels_last(w) else torch.contiguous_format)
        return self.res4(self.res3(self.res2(self.stem(x))))


class SigmoidRPNHead(RPNHead):
    """maskrcnn_benchmark's SingleConvRPNHead: A objectness logits (sigmoid), 4A deltas."""

    def __init__(self, cfg: VinvlConfig, cin: int):
        super().__init__(cfg, cin)
        self.objectness_logits = nn.Conv2d(cfg.rpn_channels, cfg.num_anchors, 1)


class ProposalGenerator(nn.Module):
    def __init__(self, cfg: VinvlConfig, cin: int):
        super().__init__()
        self.anchor_generator = nn.Module()
        # maskrcnn_benchmark's generate_anchors(16, sizes, ratios) is Caffe's with scales = sizes / 16
        self.anchor_generator.cell_anchors = _BufferList(caffe_cell_anchors(
            cfg.feature_stride, cfg.anchor_ratios, tuple(s / cfg.feature_stride for s in cfg.anchor_sizes)))
        self.rpn_head = SigmoidRPNHead(cfg, cin)


class BoxPredictor(nn.Module):
    """FastRCNNPredictor (cls_score, bbox_pred) + AttributeRCNNPredictor (cls_embed, fc_attr,
    attr_score), under BUTD's names."""

    def __init__(self, cfg: VinvlConfig, dim: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, cfg.num_classes)
        self.bbox_pred = nn.Linear(dim, 4 * cfg.num_classes)  # loaded, unused: IGNORE_BOX_REGRESSION
        self.cls_embed = nn.Embedding(cfg.num_classes, cfg.cls_embed_dim)
        self.attr_linear1 = nn.Linear(dim + cfg.cls_embed_dim, cfg.attr_hidden)
        self.attr_linear2 = nn.Linear(cfg.attr_hidden, cfg.num_attrs)

    def class_logits(self, features):
        return self.cls_score(features.to(self.cls_score.weight.dtype))

    def attr_logits(self, features, labels):
        """Attribute logits of regions whose detected label (1..C-1) is `labels`."""
        x = torch.cat([features.to(self.attr_linear1.weight.dtype), self.cls_embed(labels)], 1)
        return self.attr_linear2(F.relu(self.attr_linear1(x)))


class ROIHeads(nn.Module):
    def __init__(self, cfg: VinvlConfig):
        super().__init__()
        self.res5 = make_stage(cfg, 5, cfg.res5_blocks, cfg.stage_out(4), cfg.res5_stride, cfg.res5_dilation)
        self.box_predictor = BoxPredictor(cfg, cfg.feature_dim)


class VinvlModel(ButdModel):
    def __init__(self, cfg: VinvlConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.proposal_generator = ProposalGenerator(cfg, cfg.stage_out(4))
        self.roi_heads = ROIHeads(cfg)

    def rpn_raw(self, res4: torch.Tensor) -> RPNRaw:
        """Logits (H*W*A, 1) and deltas (H*W*A, 4) in permute_and_flatten's (H, W, A) order."""
        logits, deltas = self.proposal_generator.rpn_head(res4)
        a = self.cfg.num_anchors
        _, _, h, w = logits.shape
        logits = logits.view(a, 1, h, w).permute(2, 3, 0, 1).reshape(-1, 1)
        deltas = deltas.view(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        cell = self.proposal_generator.anchor_generator.cell_anchors[0]
        return RPNRaw(logits, deltas, grid_anchors(cell, h, w, self.cfg.feature_stride))

    def proposals(self, raw: RPNRaw, image_hw: tuple[int, int], scale: float = 1.0):
        """RPNPostProcessor's order: sigmoid, top pre_nms (topk, sorted), decode (x2 - 1), clip
        to [0, W-1] x [0, H-1], drop boxes whose +1 side is below min_size, NMS (torchvision's),
        the best post_nms.
        -> (boxes (P, 4), scores (P,)) in input pixels."""
        cfg = self.cfg
        scores = raw.objectness_logits[:, 0].float().sigmoid()
        scores, top = scores.topk(min(cfg.pre_nms_topk, scores.numel()), sorted=True)
        boxes = decode_boxes(raw.anchor_deltas.float()[top], raw.anchors[top], scale_clamp=cfg.scale_clamp)
        boxes = clip_boxes(boxes, *image_hw)
        keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= cfg.rpn_min_size) & \
               ((boxes[:, 3] - boxes[:, 1] + 1) >= cfg.rpn_min_size)
        boxes, scores = boxes[keep], scores[keep]
        kept = nms(boxes, scores, cfg.rpn_nms)[:cfg.post_nms_topk]  # torchvision's, as the reference (ops.py)
        return boxes[kept], scores[kept]

    def roi_pooler(self, res4: torch.Tensor, boxes: torch.Tensor, nonnegative: bool | None = None):
        """-> pool(start, stop): ROIAlign 14x14 of boxes[start:stop] (sampling ratio 0 = adaptive,
        aligned=False: maskrcnn_benchmark's kernel) in fp32 on fp32 boxes, returned in res5's
        dtype by the caller's cast. `nonnegative` is BUTD's max-pooling hint, unused here."""
        r, scale = self.cfg.pooler_resolution, 1.0 / self.cfg.feature_stride
        return lambda start, stop: roi_align(res4.float(), [boxes[start:stop].float()], output_size=(r, r),
                                             spatial_scale=scale, sampling_ratio=self.cfg.pooler_sampling_ratio,
                                             aligned=False)

    def class_logits(self, features):
        return self.roi_heads.box_predictor.class_logits(features).float()

    def attr_logits(self, features, labels):
        return self.roi_heads.box_predictor.attr_logits(features, labels).float()

    def head_outputs_of(self, features: torch.Tensor, deltas: bool = False):
        """Features and class logits; attributes need the detected labels, so the detector asks
        for them after selection (attr_logits). Box deltas are never used (IGNORE_BOX_REGRESSION)."""
        from ..butd.model import HeadOutputs
        return HeadOutputs(features, self.class_logits(features), None, None)
