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


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_hardware(flags: set[str] | None = None) -> str:
    """Which bf16 matrix hardware this CPU has: "AMX" (amx_bf16: Sapphire Rapids and later),
    "AVX512-BF16" (avx512_bf16: bf16 dot products, e.g. AMD Zen 4, Cooper Lake) or "none"
    (oneDNN then converts bf16 to fp32 around fp32 arithmetic: no faster, often slower)."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "none"


def cpu_description() -> str:
    """The CPU model and its bf16 hardware, e.g. 'Intel(R) Xeon(R) Processor @ 2.80GHz (bf16: none)'."""
    return f"{_cpu_name()} (bf16: {bf16_hardware()})"


def hint_cache_path() -> "Path":
    import os
    from pathlib import Path
    base = os.environ.get("TERANPREP_HINT_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "teranprep" / "bf16-speedup.json"


def bf16_speedup(threads: int) -> float:
    """bf16 / fp32 rate of the ROI-head kernel on this CPU at `threads` threads. Measured once per
    CPU model, torch version and thread count (~0.2 s; on a CPU without bf16 hardware ~1 s) and
    cached in hint_cache_path()."""
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
    return float(ratio)


def bf16_speedup_hint(threads: int) -> str | None:
    """One line: how much faster the ROI-head kernel runs in bf16 than fp32 on this CPU, for the
    fp32 default to point at the faster option; None when bf16 is not clearly faster."""
    ratio = bf16_speedup(threads)
    if ratio < MIN_HINT_SPEEDUP:
        return None
    return (f"note: --precision bf16 would run the detector's main kernel {ratio:.1f}x faster on this "
            "CPU (features drift slightly; see docs/ARCHITECTURE.md 'Precision')")


def bf16_slowdown_warning(threads: int) -> str | None:
    """For --precision bf16 on a CPU where it is slower than fp32 (no AMX / AVX512-BF16: oneDNN
    converts bf16 to fp32 around fp32 arithmetic; 5x slower on an Ice Lake Xeon, 2026-12-07):
    one warning line with the measured ratio; None when bf16 is not slower here."""
    ratio = bf16_speedup(threads)
    if ratio >= 1.0:
        return None
    return (f"WARNING: --precision bf16 runs the detector's main kernel {1 / ratio:.1f}x SLOWER than "
            f"fp32 on this CPU ({cpu_description()}); fp32 is faster here")
