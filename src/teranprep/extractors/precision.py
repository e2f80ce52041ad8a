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


# Below this measured ratio the hint says nothing: "0.5x faster" helps no one, and on CPUs
# without bf16 units bf16 is emulated and slower.
MIN_HINT_SPEEDUP = 1.2


def _cpu_name() -> str:
    import platform
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hint_cache_path() -> "Path":
    import os
    from pathlib import Path
    base = os.environ.get("TERANPREP_HINT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "teranprep" / "bf16-speedup.json"


def bf16_speedup_hint(threads: int) -> str | None:
    """One line: how much faster the ROI-head kernel runs in bf16 than fp32 on this CPU, for the
    fp32 default to point at the faster option; None when bf16 is not clearly faster. Measured
    once per CPU model, torch version and thread count (~0.2 s) and cached in hint_cache_path()."""
    import json
    path = hint_cache_path()
    key = f"{_cpu_name()} | torch {torch.__version__} | {threads} threads"
    try:
        cache = json.loads(path.read_text("utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    ratio = cache.get(key)
    if not isinstance(ratio, (int, float)):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            ratio = conv_rate("bf16", batch=8, reps=2) / conv_rate("fp32", batch=8, reps=2)
        finally:
            torch.set_num_threads(before)
        try:
            from ..manifests.atomic import atomic_write_json
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {**cache, key: round(float(ratio), 3)})
        except OSError:
            pass  # a read-only home: measure again next time
    if ratio < MIN_HINT_SPEEDUP:
        return None
    return (f"note: --precision bf16 would run the detector's main kernel {ratio:.1f}x faster on this "
            "CPU (features drift slightly; see docs/ARCHITECTURE.md 'Precision')")
