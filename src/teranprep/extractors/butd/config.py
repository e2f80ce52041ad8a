"""Every size and constant of a BUTD model, and the named variants (butd-r101, butd-tiny)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ButdConfig:
    name: str
    # backbone: blocks per stage res2..res4 (res5 lives in the ROI head)
    stage_blocks: tuple[int, int, int] = (3, 4, 23)
    res5_blocks: int = 3
    stem_channels: int = 64
    res2_bottleneck: int = 64  # widths double at each stage; output = 4 x bottleneck
    stride_in_1x1: bool = True  # Caffe/MSRA ResNets downsample in the 1x1 conv
    bn_eps: float = 1e-5
    res5_stride: int = 1
    res5_dilation: int = 2
    # RPN
    rpn_channels: int = 512
    feature_stride: int = 16
    anchor_base: int = 16  # Caffe generate_anchors(base_size=16, ratios, scales)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)  # x 16 = sizes 64..512
    pre_nms_topk: int = 6000
    post_nms_topk: int = 300
    rpn_nms: float = 0.7
    rpn_min_size: float = 16.0
    scale_clamp: float = math.log(1000.0 / 16)
    # ROI head
    pooler_resolution: int = 14
    num_classes: int = 1601  # background + 1600 Visual Genome objects
    num_attrs: int = 401  # no-attribute + 400; 0 = no attribute head
    cls_embed_dim: int = 256
    attr_hidden: int = 512
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    class_nms: float = 0.3
    # preprocessing (Caffe: BGR, mean subtracted, std 1)
    pixel_mean_bgr: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    test_short: int = 600
    test_max: int = 1000

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_scales)

    def stage_out(self, stage: int) -> int:
        """Output channels of res2..res5 (stage = 2..5)."""
        return 4 * self.res2_bottleneck * 2 ** (stage - 2)

    @property
    def feature_dim(self) -> int:
        return self.stage_out(5)


VARIANTS = {
    # The published model: ResNet-101 C4, Visual Genome 1600 objects / 400 attributes.
    "butd-r101": ButdConfig(name="butd-r101"),
    # Same code path, few and narrow blocks, fewer classes and proposals: for tests and demos.
    "butd-tiny": ButdConfig(name="butd-tiny", stage_blocks=(1, 1, 1), res5_blocks=1,
                            stem_channels=16, res2_bottleneck=8, rpn_channels=64,
                            pre_nms_topk=1000, post_nms_topk=100, num_classes=101, num_attrs=41,
                            cls_embed_dim=32, attr_hidden=64),
}


def get_config(name: str, **overrides) -> ButdConfig:
    return replace(VARIANTS[name], **overrides)
