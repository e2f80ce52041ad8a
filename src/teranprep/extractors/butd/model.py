"""The BUTD network as separate callable pieces: backbone to res4, RPN, ROI pooling + res5, predictors.

Module and parameter names follow detectron2 / MILVLG (backbone.res4.22.conv2.norm.running_var, ...)
so a MILVLG checkpoint loads without renaming. Training code (issue 7) uses `rpn_raw` (logits,
deltas, anchors) and `head_outputs` (class logits, box deltas, attribute logits for given
proposals) and computes its losses outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool
from torchvision.ops.misc import FrozenBatchNorm2d

from .config import ButdConfig
from .ops import (RoiMaxPool, caffe_cell_anchors, caffe_nms, clip_boxes, decode_boxes, descending_order,
                  grid_anchors, is_nonnegative)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

# oneDNN's convolution with fused post-ops (what torch.compile's CPU backend calls): bias, ReLU and
# the residual add happen on the accumulator while it is in cache, instead of three more passes
# over a 13-26 MB activation.
_FUSED_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
_FUSED_CONV_INTO = getattr(torch.ops.mkldnn, "_convolution_pointwise_", None)


def _channels_last(weight: torch.Tensor) -> bool:
    return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()


class ConvNorm(nn.Conv2d):
    """A bias-free conv with its frozen batch norm as `.norm` (detectron2's key layout)."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0, dilation=1, eps=1e-5, groups=1):
        super().__init__(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=False)
        self.norm = FrozenBatchNorm2d(cout, eps=eps)
        self._packed = None  # (key, weight in oneDNN's blocked layout), made at the first fused call

    def forward(self, x, relu: bool = False, residual: torch.Tensor | None = None, into_residual: bool = False):
        """conv, norm, then `+ residual` and ReLU when asked. For inference on CPU with the norm
        folded, one oneDNN call does all of it (the same maths; the sum is rounded once).
        `into_residual`: the caller no longer needs `residual`, so that call may write its result
        into it (bit for bit the same values; no fresh 13-26 MB output to fault in, one stream of
        memory traffic less)."""
        if self._fusable(x):
            args = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
            weight = self._blocked_weight(x, args)
            if residual is None:
                return _FUSED_CONV(x, weight, self.bias, *args, "relu" if relu else "none", [], None)
            if into_residual and _FUSED_CONV_INTO is not None and residual.dtype == x.dtype \
                    and residual.is_contiguous(memory_format=torch.channels_last):
                return _FUSED_CONV_INTO.binary(residual, x, weight, self.bias, *args, "add", 1.0,
                                               "relu" if relu else None, [], None)
            return _FUSED_CONV.binary(x, residual, weight, self.bias, *args, "add", 1.0,
                                      "relu" if relu else None, [], None)
        out = self.norm(super().forward(x))
        if residual is not None:
            out = out + residual
        return F.relu_(out) if relu else out

    def _fusable(self, x) -> bool:
        return (_FUSED_CONV is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
                and self.bias is not None and isinstance(self.norm, nn.Identity)
                and x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
                and torch.backends.mkldnn.is_available())

    def _blocked_weight(self, x, args):
        """The weight reordered once into the blocked layout oneDNN picks for this input shape
        (otherwise every call reorders it again: 20-30% of a bf16 res5 conv here). Any other
        input shape still gets the same results bit for bit, only possibly a reorder per call;
        a weight changed in place or replaced is packed again."""
        key = (self.weight.data_ptr(), self.weight.dtype, self.weight._version)
        if self._packed is None or self._packed[0] != key:
            try:
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    self.weight.to_mkldnn(), args[0], args[1], args[2], args[3], list(x.shape))
            except (RuntimeError, AttributeError):  # a build without it: the plain weight
                packed = self.weight
            self._packed = (key, packed)
        return self._packed[1]

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Folds the frozen batch norm into the conv's weight and a bias (inference only): the
        same affine map, one pass over the activations less, and no bf16 rsqrt of running_var."""
        if isinstance(self.norm, nn.Identity):
            return
        n = self.norm
        scale = n.weight * (n.running_var + n.eps).rsqrt()
        self.weight.mul_(scale.view(-1, 1, 1, 1))
        self.bias = nn.Parameter(n.bias - n.running_mean * scale, requires_grad=False)
        self.norm = nn.Identity()


class Bottleneck(nn.Module):
    """ResNet bottleneck; `groups` > 1 makes the 3x3 conv grouped (ResNeXt, VinVL's X152)."""

    def __init__(self, cin, bottleneck, cout, stride, dilation, stride_in_1x1, eps, groups=1):
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.shortcut = ConvNorm(cin, cout, 1, stride=stride, eps=eps) if cin != cout else None
        self.conv1 = ConvNorm(cin, bottleneck, 1, stride=s1, eps=eps)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, stride=s3, padding=dilation,
                              dilation=dilation, eps=eps, groups=groups)
        self.conv3 = ConvNorm(bottleneck, cout, 1, eps=eps)
        self.conv1_shortcut = None  # merge_conv1_shortcut(): conv1 and the shortcut as one conv
        # for_inference(): set on every block after a stage's first, whose input only the previous
        # block's output is (nobody else holds it), so conv3 may add into it in place
        self.owns_input = False

    def forward(self, x):
        if self.conv1_shortcut is not None:
            b = self.conv1.out_channels
            both = self.conv1_shortcut(x)  # (N, b + cout, H, W): conv1's channels, then the shortcut's
            # The halves stay strided views (no copy: oneDNN reads a strided channels-last tensor
            # as it is); the ReLU of conv1's half runs in place.
            out = both[:, :b]
            out = F.relu(out) if torch.is_grad_enabled() else F.relu_(out)
            return self.conv3(self.conv2(out, relu=True), relu=True, residual=both[:, b:])
        out = self.conv2(self.conv1(x, relu=True), relu=True)
        if self.shortcut is not None:
            return self.conv3(out, relu=True, residual=self.shortcut(x), into_residual=True)
        return self.conv3(out, relu=True, residual=x, into_residual=self.owns_input)

    def mergeable(self) -> bool:
        """conv1 and the projection shortcut read the same input with the same stride (BUTD's
        stride-in-1x1 blocks, and every network's first res2 block): one conv can do both."""
        c1, sc = self.conv1, self.shortcut
        return (sc is not None and self.conv1_shortcut is None
                and all(c.kernel_size == (1, 1) and c.padding == (0, 0) and c.dilation == (1, 1)
                        and c.groups == 1 for c in (c1, sc))
                and c1.stride == sc.stride
                and isinstance(c1.norm, nn.Identity) and isinstance(sc.norm, nn.Identity)
                and c1.weight.dtype == sc.weight.dtype)

    @torch.no_grad()
    def merge_conv1_shortcut(self) -> bool:
        """For inference, after fold_norm: conv1 and the shortcut become one conv with their
        weights stacked (conv1's output channels first), whose output is split; the input is read
        once and oneDNN runs one larger GEMM. conv1 and shortcut keep their names, their weights
        now views into the merged one (no second copy). Each output channel is the same dot
        product as before; only the kernel's blocking (so float reassociation) may differ.
        -> whether the block was merged."""
        if not self.mergeable():
            return False
        c1, sc = self.conv1, self.shortcut
        b, cout = c1.out_channels, sc.out_channels
        layout = torch.channels_last if _channels_last(c1.weight) or _channels_last(sc.weight) \
            else torch.contiguous_format
        merged = ConvNorm(c1.in_channels, b + cout, 1, stride=c1.stride).to(c1.weight.device)
        merged.norm = nn.Identity()
        weight = torch.cat([c1.weight, sc.weight]).contiguous(memory_format=layout)
        merged.weight = nn.Parameter(weight, requires_grad=False)
        merged.bias = nn.Parameter(torch.cat([c1.bias, sc.bias]), requires_grad=False)
        c1.weight, sc.weight = (nn.Parameter(weight[:b], requires_grad=False),
                                nn.Parameter(weight[b:], requires_grad=False))
        c1.bias, sc.bias = (nn.Parameter(merged.bias[:b], requires_grad=False),
                            nn.Parameter(merged.bias[b:], requires_grad=False))
        self.conv1_shortcut = merged
        return True


def make_stage(cfg: ButdConfig, stage: int, blocks: int, cin: int, first_stride: int, dilation: int = 1):
    bottleneck = cfg.res2_bottleneck * 2 ** (stage - 2)
    cout = cfg.stage_out(stage)
    layers = []
    for i in range(blocks):
        layers.append(Bottleneck(cin, bottleneck, cout, first_stride if i == 0 else 1, dilation,
                                 cfg.stride_in_1x1, cfg.bn_eps))
        cin = cout
    return nn.Sequential(*layers)


class Stem(nn.Module):
    def __init__(self, cfg: ButdConfig):
        super().__init__()
        self.conv1 = ConvNorm(3, cfg.stem_channels, 7, stride=2, padding=3, eps=cfg.bn_eps)

    def forward(self, x):
        # Caffe's pooling: no padding, output size rounded up (ceil mode)
        return F.max_pool2d(self.conv1(x, relu=True), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """Stem + res2..res4: image (1, 3, H, W) -> res4 (1, C4, ~H/16, ~W/16)."""

    def __init__(self, cfg: ButdConfig):
        super().__init__()
        self.stem = Stem(cfg)
        self.res2 = make_stage(cfg, 2, cfg.stage_blocks[0], cfg.stem_channels, 1)
        self.res3 = make_stage(cfg, 3, cfg.stage_blocks[1], cfg.stage_out(2), 2)
        self.res4 = make_stage(cfg, 4, cfg.stage_blocks[2], cfg.stage_out(3), 2)

    def forward(self, x):
        # the input follows the weights' dtype and layout (fp32 or bf16, channels-last)
        w = self.stem.conv1.weight
        x = x.to(w.dtype, memory_format=torch.channels_last if _channels_last(w) else torch.contiguous_format)
        return self.res4(self.res3(self.res2(self.stem(x))))


class _BufferList(nn.Module):
    def __init__(self, *tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __getitem__(self, i):
        return getattr(self, str(i))


class AnchorGenerator(nn.Module):
    def __init__(self, cfg: ButdConfig):
        super().__init__()
        # Replaced by the checkpoint's anchors when it has them (MILVLG's config sizes are
        # placeholders); these are Caffe's generate_anchors values, which those hold.
        self.cell_anchors = _BufferList(caffe_cell_anchors(cfg.anchor_base, cfg.anchor_ratios,
                                                           cfg.anchor_scales))


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 2A objectness logits (first A background, last A foreground) and 4A deltas."""

    def __init__(self, cfg: ButdConfig, cin: int):
        super().__init__()
        a = cfg.num_anchors
        self.conv = nn.Conv2d(cin, cfg.rpn_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(cfg.rpn_channels, 2 * a, 1)
        self.anchor_deltas = nn.Conv2d(cfg.rpn_channels, 4 * a, 1)

    def forward(self, x):
        t = F.relu(self.conv(x.to(self.conv.weight.dtype)))
        # the 1x1 logit and delta convs may stay fp32 under a bf16 trunk: proposals are selected
        # from them, and they cost under 1% of the model
        t = t.to(self.objectness_logits.weight.dtype, memory_format=torch.contiguous_format)
        return self.objectness_logits(t), self.anchor_deltas(t)


class ProposalGenerator(nn.Module):
    def __init__(self, cfg: ButdConfig, cin: int):
        super().__init__()
        self.anchor_generator = AnchorGenerator(cfg)
        self.rpn_head = RPNHead(cfg, cin)


class BoxPredictor(nn.Module):
    def __init__(self, cfg: ButdConfig, dim: int):
        super().__init__()
        self.cls_score = nn.Linear(dim, cfg.num_classes)
        self.bbox_pred = nn.Linear(dim, 4 * cfg.num_classes)
        self.has_attributes = cfg.num_attrs > 0
        if self.has_attributes:
            self.cls_embed = nn.Embedding(cfg.num_classes, cfg.cls_embed_dim)
            self.attr_linear1 = nn.Linear(dim + cfg.cls_embed_dim, cfg.attr_hidden)
            self.attr_linear2 = nn.Linear(cfg.attr_hidden, cfg.num_attrs)

    def forward(self, features, deltas: bool = True):
        """-> (class logits, box deltas or None when not asked for, attribute logits or None).
        The 4 x 1601 box deltas are 80% of the predictors' FLOPs, and only regressed boxes use them."""
        features = features.to(self.cls_score.weight.dtype)
        logits = self.cls_score(features)
        deltas = self.bbox_pred(features) if deltas else None
        attr_logits = None
        if self.has_attributes:
            # fed the argmax over ALL classes, background included, as the original does
            embed = self.cls_embed(torch.argmax(logits, dim=1))
            attr_logits = self.attr_linear2(F.relu(self.attr_linear1(torch.cat([features, embed], 1))))
        return logits, deltas, attr_logits


class ROIHeads(nn.Module):
    def __init__(self, cfg: ButdConfig):
        super().__init__()
        self.res5 = make_stage(cfg, 5, cfg.res5_blocks, cfg.stage_out(4), cfg.res5_stride, cfg.res5_dilation)
        self.box_predictor = BoxPredictor(cfg, cfg.feature_dim)


@dataclass
class RPNRaw:
    """Raw RPN outputs for one image, flattened in (H, W, A) order, with their anchors."""

    objectness_logits: torch.Tensor  # (H*W*A, 2): background, foreground
    anchor_deltas: torch.Tensor  # (H*W*A, 4)
    anchors: torch.Tensor  # (H*W*A, 4) in resized-image pixels


@dataclass
class HeadOutputs:
    features: torch.Tensor  # (R, D) mean-pooled res5 output
    class_logits: torch.Tensor  # (R, num_classes)
    box_deltas: torch.Tensor | None  # (R, 4 * num_classes); None when not asked for
    attr_logits: torch.Tensor | None  # (R, num_attrs)


class ButdModel(nn.Module):
    def __init__(self, cfg: ButdConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.proposal_generator = ProposalGenerator(cfg, cfg.stage_out(4))
        self.roi_heads = ROIHeads(cfg)

    # -- pieces -----------------------------------------------------------------------------
    def rpn_raw(self, res4: torch.Tensor) -> RPNRaw:
        """RPN logits/deltas of one image's res4 map, and the matching anchors."""
        logits, deltas = self.proposal_generator.rpn_head(res4)
        a = self.cfg.num_anchors
        _, _, h, w = logits.shape
        # (1, 2A, H, W) -> (1, 2, A, H, W) -> (H, W, A, 2): Caffe's bg/fg halves
        logits = logits.view(2, a, h, w).permute(2, 3, 1, 0).reshape(-1, 2)
        deltas = deltas.view(a, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        cell = self.proposal_generator.anchor_generator.cell_anchors[0]
        return RPNRaw(logits, deltas, grid_anchors(cell, h, w, self.cfg.feature_stride))

    def proposals(self, raw: RPNRaw, image_hw: tuple[int, int], scale: float):
        """MILVLG's order: decode, clip, drop degenerate and small boxes, top pre_nms by
        foreground probability, Caffe NMS, first post_nms kept. -> (boxes (P, 4), scores (P,))."""
        cfg = self.cfg
        scores = torch.softmax(raw.objectness_logits, dim=1)[:, 1]
        boxes = clip_boxes(decode_boxes(raw.anchor_deltas, raw.anchors, scale_clamp=cfg.scale_clamp),
                           *image_hw)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        min_side = cfg.rpn_min_size * scale
        keep &= ((boxes[:, 2] - boxes[:, 0] + 1) > min_side) & ((boxes[:, 3] - boxes[:, 1] + 1) > min_side)
        boxes, scores = boxes[keep], scores[keep]
        top = descending_order(scores)[:cfg.pre_nms_topk]
        boxes, scores = boxes[top], scores[top]
        kept = caffe_nms(boxes, scores, cfg.rpn_nms, max_keep=cfg.post_nms_topk)
        return boxes[kept], scores[kept]

    def roi_pooler(self, res4: torch.Tensor, boxes: torch.Tensor, nonnegative: bool | None = None):
        """-> pool(start, stop): ROIPool 14x14 of boxes[start:stop] (resized-image pixels, fp32: a
        bf16 box corner at x = 1000 would be off by up to 4 px) on res4 -> (R, C4, 14, 14). For
        inference on a CPU, one ops.RoiMaxPool for all of the image's boxes (its max tables built
        once for the chunks of an image), in res4's own dtype and layout (a max of bf16 values is
        exact, so the values are those of fp32 pooling); with gradients, torchvision's roi_pool
        (same values, with a backward)."""
        r, scale = self.cfg.pooler_resolution, 1.0 / self.cfg.feature_stride
        if not torch.is_grad_enabled() and res4.device.type == "cpu":
            return RoiMaxPool(res4, boxes.float(), r, scale, nonnegative)
        return lambda start, stop: roi_pool(res4.float(), [boxes[start:stop].float()], output_size=(r, r),
                                            spatial_scale=scale)

    def res5_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """res5 on pooled ROIs in its weights' dtype and layout, then the fp32 mean -> (R, D)."""
        res5 = self.roi_heads.res5
        w = res5[0].conv2.weight  # a 3x3 conv: a 1x1 weight is contiguous in both layouts
        layout = torch.channels_last if _channels_last(w) else torch.contiguous_format
        out = res5(pooled.to(w.dtype, memory_format=layout))
        if out.dtype == torch.float32 or torch.is_grad_enabled():
            return out.float().mean(dim=(2, 3))
        # one ROI at a time: each fp32 copy (1.6 MB) stays in cache, where a whole chunk's
        # (26 MB) would be written out and read back
        return torch.stack([roi.float().mean(dim=(1, 2)) for roi in out])

    def roi_features(self, parts, chunk: int | None = None) -> torch.Tensor:
        """Pooled res5 features of every (res4, boxes) in `parts` (one or several images), in
        order -> (sum of R, D). `chunk` ROIs are pooled and run through res5 at a time when
        given: that bounds the activation memory (300 proposals x 2048 x 14 x 14 is 480 MB per
        fp32 tensor) and keeps each activation small enough for the allocator to reuse instead of
        mapping fresh pages. Each ROI is its own sample, so chunking and which images share a
        call change no formula, only the kernel's blocking."""
        pending, count, outs = [], 0, []
        inference = not torch.is_grad_enabled()
        signs = {id(res4): is_nonnegative(res4) if inference and len(b) else None for res4, b in parts}

        def flush():
            pooled = [pool(a, b) for pool, a, b in pending]
            outs.append(self.res5_features(pooled[0] if len(pooled) == 1 else torch.cat(pooled)))
            pending.clear()

        for res4, boxes in parts:
            start = 0
            pool = self.roi_pooler(res4, boxes, signs[id(res4)]) if len(boxes) else None
            while start < len(boxes):
                take = len(boxes) - start if chunk is None else min(chunk - count, len(boxes) - start)
                pending.append((pool, start, start + take))
                start, count = start + take, count + take
                if chunk is not None and count == chunk:
                    flush()
                    count = 0
        if pending:
            flush()
        if not outs:
            return torch.zeros((0, self.cfg.feature_dim), device=parts[0][0].device if parts else None)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def box_features(self, res4: torch.Tensor, boxes: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """ROIPool 14x14 of `boxes` (resized-image pixels) on res4, res5, mean over 14x14 -> (R, D)."""
        return self.roi_features([(res4, boxes)], chunk)

    def predict(self, features: torch.Tensor, deltas: bool = True):
        return self.roi_heads.box_predictor(features, deltas)

    def head_outputs(self, res4: torch.Tensor, boxes: torch.Tensor, chunk: int | None = None) -> HeadOutputs:
        return self.head_outputs_of(self.box_features(res4, boxes, chunk))

    def head_outputs_of(self, features: torch.Tensor, deltas: bool = True) -> HeadOutputs:
        return HeadOutputs(features, *(None if t is None else t.float() for t in self.predict(features, deltas)))

    def for_inference(self, precision: str = "fp32", channels_last: bool = True,
                      merge_shortcuts: bool = False) -> "ButdModel":
        """In place, for detection only (no training afterwards): frozen norms folded into the
        convs (then bias, ReLU and residual adds run fused with them on CPU), the conv trunks (backbone, RPN 3x3 conv, res5) cast to the precision
        and channels-last; the RPN logit/delta convs, predictors and anchors stay fp32, so
        proposals, class scores and NMS are computed from fp32 arithmetic. Casting in place
        leaves no fp32 copy of the trunk's weights behind. Each block's last conv adds into its
        residual in place where nothing else holds that tensor (Bottleneck.owns_input). `merge_shortcuts`: every block whose
        conv1 and projection shortcut share input and stride runs them as one conv
        (Bottleneck.merge_conv1_shortcut); off by default, because it measured slower on the
        CPUs it could be timed on (benchmarks/README.md, 2026-12-07: the split halves are strided
        and oneDNN copies them); DetectorSpec option ("merge_shortcuts", True) turns it on."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.eval().requires_grad_(False)
        trunks = (self.backbone, self.proposal_generator.rpn_head.conv, self.roi_heads.res5)
        for m in self.modules():
            if isinstance(m, ConvNorm):
                m.fold_norm()
        for trunk in trunks:
            trunk.to(dtype=PRECISIONS[precision])
            if channels_last:
                trunk.to(memory_format=torch.channels_last)
        for stage in self.modules():  # see Bottleneck.owns_input
            if isinstance(stage, nn.Sequential):
                for block in list(stage)[1:]:
                    if isinstance(block, Bottleneck):
                        block.owns_input = True
        if merge_shortcuts:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    m.merge_conv1_shortcut()
        return self
