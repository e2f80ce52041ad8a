"""Numeric precision of TERAN's matrix products: fp32, or bf16 through torch.autocast.

One home for what `--precision` means, shared by train, eval and search:
- bf16: linear layers, attention and the region-word similarity GEMM run in bfloat16 (CPU AMX /
  AVX512-BF16, CUDA tensor cores); the L2 normalisation of the token vectors, the sum over
  kept tokens of the max-similarities (the score), the loss and the optimizer stay in fp32.
- fp32: everything in float32 (on CUDA, training.amp may still add float16 autocast).
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import PrepError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, where: str = "--precision") -> str:
    if precision not in PRECISIONS:
        raise PrepError(f"{where} {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the similarity GEMM runs in (and encoded token sets are kept in)."""
    return torch.bfloat16 if check_precision(precision) == "bf16" else torch.float32


def autocast(device, precision: str):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16)
