"""The bottom-up-attention (BUTD) Faster R-CNN rebuilt from torch + torchvision with Caffe semantics."""

from .config import VARIANTS, ButdConfig, get_config

__all__ = ["VARIANTS", "ButdConfig", "get_config"]
