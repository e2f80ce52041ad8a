"""How fast this machine runs the detector's dominant kernel in each precision (conv rate, bf16 hint)."""

from __future__ import annotations

import time

import torch
from torch import nn


def conv_rate(precision: str = "fp32", batch: int = 32, reps: int = 3, device: str = "cpu") -> float:
    """Sustained FLOP/s of a res5-shaped 3x3 dilated conv (512 -> 512 at 14x14), channels-last,
    in fp32 or bf16: the kernel that is ~90% of BUTD's FLOPs (the ROI head)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    conv = nn.Conv2d(512, 512, 3, padding=2, dilation=2, bias=False).eval().to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 512, 14, 14, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * 512 * 14 * 14 * 512 * 9
    with torch.inference_mode():
        conv(x)
        best = float("inf")
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            conv(x)
            if device != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return flops / best


def bf16_speedup_hint(threads: int) -> str:
    """One line: how much faster the ROI-head kernel runs in bf16 than fp32 here (~0.2 s to
    measure), for the fp32 default to point at the faster option."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ratio = conv_rate("bf16", batch=8, reps=2) / conv_rate("fp32", batch=8, reps=2)
    finally:
        torch.set_num_threads(before)
    return (f"note: --precision bf16 would run the detector's main kernel {ratio:.1f}x faster on this "
            "CPU (features drift slightly; see docs/ARCHITECTURE.md 'Precision')")
