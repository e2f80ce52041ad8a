"""Block 1 of a BUTD stage with conv1 + shortcut merged into one conv (Bottleneck.merge_conv1_shortcut)
against the two separate convs, per precision, interleaved in one process.

    python benchmarks/bench_merge_block.py [--reps 8] [--threads 2]

Shapes: res5.0 on 16 ROIs (ROI_CHUNK) of 14x14, res4.0 and res3.0 on a 600x1000 image's maps;
random folded weights, channels-last, inference mode. Per block: the median wall of the whole
block separate vs merged, and its parts (the merged conv alone, conv1 + shortcut alone). Prints
the CPU model, its bf16 hardware and the load average.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from teranprep.extractors.butd.model import Bottleneck, ConvNorm
from teranprep.extractors.precision import cpu_description

SHAPES = {"res5.0 (16 ROIs, 14x14)": (1024, 512, 2048, 1, 2, (16, 1024, 14, 14)),
          "res4.0 (75x125)": (512, 256, 1024, 2, 1, (1, 512, 75, 125)),
          "res3.0 (150x250)": (256, 128, 512, 2, 1, (1, 256, 150, 250))}


def block(cin, b, cout, stride, dilation, dtype):
    torch.manual_seed(0)
    m = Bottleneck(cin, b, cout, stride, dilation, True, 1e-5).eval()
    for c in m.modules():
        if isinstance(c, ConvNorm):
            c.fold_norm()
    return m.to(dtype=dtype, memory_format=torch.channels_last)


def median_ms(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU {cpu_description()}, torch {torch.__version__}, {a.threads} threads, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
    print("| precision | block | separate ms | merged ms | merged / separate | merged conv alone ms | "
          "conv1 + shortcut alone ms | equal bits | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for name, (cin, b, cout, s, d, shape) in SHAPES.items():
            sep = block(cin, b, cout, s, d, dtype)
            mer = copy.deepcopy(sep)
            assert mer.merge_conv1_shortcut()
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                ms = median_ms({"sep": lambda: sep(x), "mer": lambda: mer(x),
                                "conv": lambda: mer.conv1_shortcut(x),
                                "two": lambda: (sep.conv1(x, relu=True), sep.shortcut(x))}, a.reps)
                equal = torch.equal(sep(x), mer(x))
            print(f"| {str(dtype)[6:]} | {name} | {ms['sep']:.1f} | {ms['mer']:.1f} | {ms['mer'] / ms['sep']:.2f} | "
                  f"{ms['conv']:.1f} | {ms['two']:.1f} | {equal} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
