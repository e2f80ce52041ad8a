"""VinVL's ResNeXt-152 C4 detector (objects + attributes) from torch + torchvision, as scene_graph_benchmark runs it."""

from .config import VARIANTS, VinvlConfig, get_config

__all__ = ["VARIANTS", "VinvlConfig", "get_config"]
