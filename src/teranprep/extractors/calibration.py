"""Deterministic random weights that keep activations finite and in float16 range.

A randomly initialised deep backbone in eval mode with identity batch norms grows activations
block after block (past 65504, float16's limit, in a ResNet-101). We seed the initialisation, then
set every frozen batch norm's statistics from its own input on one fixed calibration image, in a
single forward pass: each layer then sees normalised inputs, as in a trained network.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def freeze_batchnorms(module: nn.Module) -> nn.Module:
    """Replaces every nn.BatchNorm2d by a FrozenBatchNorm2d holding the same statistics."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorms(child)
    return module


def calibration_image(seed: int, height: int = 320, width: int = 480) -> torch.Tensor:
    """A fixed, structured RGB image (3,H,W) in [0,255]: smooth gradients plus seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(-1, 1)
    xs = torch.linspace(0, 1, width).view(1, -1)
    base = torch.stack([ys * xs, ys.expand(height, width), xs.expand(height, width)]) * 200
    return (base + 55 * torch.rand(3, height, width, generator=gen)).clamp(0, 255)


@torch.no_grad()
def calibrate_frozen_batchnorms(model: nn.Module, run_forward, types=(FrozenBatchNorm2d,)) -> None:
    """Sets each frozen batch norm's mean/var to its input statistics during `run_forward()`.

    `types`: the frozen batch-norm classes (weight, bias, running_mean, running_var buffers) to
    calibrate; detectron2 has its own FrozenBatchNorm2d."""
    def hook(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        module.weight.fill_(1.0)
        module.bias.zero_()

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, tuple(types))]
    try:
        run_forward()
    finally:
        for h in handles:
            h.remove()
