"""Every size and constant of a VinVL model, and the named variants (vinvl-x152c4, vinvl-tiny).

The values are those of scene_graph_benchmark's sgg_configs/vgattr/vinvl_x152c4.yaml over
maskrcnn_benchmark's config defaults, with VinVL's feature-extraction settings
(TEST.OUTPUT_FEATURE, TEST.IGNORE_BOX_REGRESSION): the field comments name the config key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VinvlConfig:
    name: str
    # backbone (MODEL.BACKBONE.CONV_BODY R-152-C4): blocks of res2..res4; res5 is the ROI head
    stage_blocks: tuple[int, int, int] = (3, 8, 36)
    res5_blocks: int = 3
    stem_channels: int = 64  # RESNETS.STEM_OUT_CHANNELS
    num_groups: int = 32  # RESNETS.NUM_GROUPS
    width_per_group: int = 8  # RESNETS.WIDTH_PER_GROUP: res2 bottleneck = 32 x 8 = 256
    res2_out: int = 256  # RESNETS.RES2_OUT_CHANNELS
    stride_in_1x1: bool = False  # RESNETS.STRIDE_IN_1X1: the stride is in the 3x3 conv
    bn_eps: float = 0.0  # maskrcnn_benchmark's FrozenBatchNorm2d: weight * running_var.rsqrt()
    res5_stride: int = 2  # ResNetHead(stride_init=None) -> 2; RES5_DILATION 1
    res5_dilation: int = 1
    # RPN (SingleConvRPNHead, sigmoid objectness)
    rpn_channels: int = 1024  # = the backbone's out channels
    feature_stride: int = 16  # RPN.ANCHOR_STRIDE
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)  # RPN.ANCHOR_SIZES
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # RPN.ASPECT_RATIOS
    pre_nms_topk: int = 6000  # RPN.PRE_NMS_TOP_N_TEST
    post_nms_topk: int = 300  # RPN.POST_NMS_TOP_N_TEST
    rpn_nms: float = 0.7  # RPN.NMS_THRESH
    rpn_min_size: float = 0.0  # RPN.MIN_SIZE
    scale_clamp: float = math.log(1000.0 / 16)  # BoxCoder's bbox_xform_clip
    # ROI head
    pooler_resolution: int = 14  # ROI_BOX_HEAD.POOLER_RESOLUTION, ROIAlign
    pooler_sampling_ratio: int = 0  # ROI_BOX_HEAD.POOLER_SAMPLING_RATIO (adaptive)
    num_classes: int = 1595  # ROI_BOX_HEAD.NUM_CLASSES: background + 1594
    num_attrs: int = 525  # ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES: no-attribute + 524
    cls_embed_dim: int = 256  # ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM
    attr_hidden: int = 512  # ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM
    class_nms: float = 0.5  # ROI_HEADS.NMS (per class)
    score_halvings: int = 10  # PostProcessor: halve SCORE_THRESH up to 10 times below MIN_DETECTIONS
    attr_thresh: float = 0.05  # ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD
    attrs_per_image: int = 100  # ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG
    attrs_per_box: int = 16  # ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ
    # preprocessing (INPUT.*: BGR 0..255, mean subtracted, std 1; PIL bilinear resize)
    pixel_mean_bgr: tuple[float, float, float] = (103.530, 116.280, 123.675)
    test_short: int = 600  # INPUT.MIN_SIZE_TEST
    test_max: int = 1000  # INPUT.MAX_SIZE_TEST

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_ratios) * len(self.anchor_sizes)

    def stage_out(self, stage: int) -> int:
        """Output channels of res2..res5 (stage = 2..5)."""
        return self.res2_out * 2 ** (stage - 2)

    def bottleneck(self, stage: int) -> int:
        return self.num_groups * self.width_per_group * 2 ** (stage - 2)

    @property
    def feature_dim(self) -> int:
        return self.stage_out(5)


VARIANTS = {
    # The published model: ResNeXt-152 32x8d C4, 1594 objects / 524 attributes (VG + OI + O365 + COCO).
    "vinvl-x152c4": VinvlConfig(name="vinvl-x152c4"),
    # Same code path, few and narrow blocks, fewer classes and proposals: for tests.
    "vinvl-tiny": VinvlConfig(name="vinvl-tiny", stage_blocks=(1, 1, 1), res5_blocks=1,
                              stem_channels=16, num_groups=4, width_per_group=4, res2_out=32,
                              rpn_channels=128, pre_nms_topk=1000, post_nms_topk=100,
                              num_classes=51, num_attrs=21, cls_embed_dim=16, attr_hidden=32),
}


def get_config(name: str, **overrides) -> VinvlConfig:
    return replace(VARIANTS[name], **overrides)
