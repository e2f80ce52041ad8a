"""The one rule for `--device` in every stage: auto | cpu | cuda | cuda:N, checked up front."""

from __future__ import annotations

import re

from .errors import PrepError

_FORM = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(device: str, *, cuda_available: bool | None = None, where: str = "",
                   local_rank: int = 0) -> str:
    """"cpu", "cuda" or "cuda:N" for `device` on a machine (this one, or the workers `where`
    names, which reported `cuda_available`): auto picks cuda when there is one (cuda:LOCAL_RANK
    under torchrun), and cuda without CUDA is refused in one line before any work starts."""
    device = str(device)
    if not _FORM.match(device):
        raise PrepError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if device == "auto":
        return (f"cuda:{local_rank}" if local_rank else "cuda") if cuda_available else "cpu"
    if device.startswith("cuda") and not cuda_available:
        raise PrepError(f"--device {device} was asked for but torch sees no CUDA device{where}; "
                        "use --device cpu or auto")
    return device


def device_kind(device: str) -> str:
    """What the numbers depend on (the parameter fingerprint): cpu or cuda, not which card."""
    return device.split(":")[0]
