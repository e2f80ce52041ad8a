"""Benchmark: scoring images x captions with TERAN's MrSw alignment, against the GEMM floor.

    python benchmarks/bench_eval.py [--images 1000 --captions 5000 --regions 36 --words 12 --dim 1024]
        [--precisions fp32 bf16]

Random unit vectors stand in for encoded regions and words. The floor is the FLOPs of the
region-word similarities alone, 2*Ni*Nc*R*W*d, divided by the GEMM rate this machine reaches on a
block-shaped matrix product in that precision; the ratio says how close the blocked scoring is
to pure GEMM. Each precision runs in its own child process, one after the other (so each peak
is its own): peak memory is the child's peak RSS minus its RSS before the inputs were allocated.
bf16 inputs are held in bf16, as `prep eval --precision bf16` holds the encoded split.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import psutil
import torch

from teranprep.teran.precision import compute_dtype
from teranprep.teran.scoring import score_matrix


def gemm_rate(m: int, k: int, n: int, repeats: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def measure(a) -> dict:
    """One precision, in this process: time, GEMM floor and peak memory."""
    dtype = compute_dtype(a.child)
    rss0 = psutil.Process().memory_info().rss
    # Slot 0 (the global image vector) is part of every region set and never scored.
    regions = unit(a.images, a.regions + 1, a.dim, seed=0).to(dtype)
    words = unit(a.captions, a.words, a.dim, seed=1).to(dtype)
    region_lengths = torch.full((a.images,), a.regions + 1)
    word_lengths = torch.full((a.captions,), a.words)

    rate = gemm_rate(a.image_block * a.regions, a.dim, a.caption_block * a.words, dtype=dtype)
    t0 = time.perf_counter()
    scores = score_matrix(regions, region_lengths, words, word_lengths, mode="MrSw", drop_tokens="none",
                          image_block=a.image_block, caption_block=a.caption_block, precision=a.child)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert scores.shape == (a.images, a.captions)
    flops = 2.0 * a.images * a.captions * a.regions * a.words * a.dim
    return {"precision": a.child, "rate": rate, "floor": flops / rate, "time": elapsed,
            "peak_mb": (peak - rss0) / 2**20,
            "inputs_mb": (regions.numel() + words.numel()) * regions.element_size() / 2**20}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--image-block", type=int, default=100)
    p.add_argument("--caption-block", type=int, default=500)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a)))
        return
    rows = []
    for precision in a.precisions:
        argv = [sys.executable, __file__, "--child", precision] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
            if k not in ("precisions", "child")]
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'prec':>5} {'images':>7} {'captions':>8} {'R':>3} {'W':>3} {'d':>5} | {'GEMM GF/s':>9} "
          f"{'floor s':>8} {'time s':>8} {'ratio':>6} | {'peak MB':>8} {'inputs MB':>9}")
    for r in rows:
        print(f"{r['precision']:>5} {a.images:>7} {a.captions:>8} {a.regions:>3} {a.words:>3} {a.dim:>5} | "
              f"{r['rate'] / 1e9:>9.1f} {r['floor']:>8.2f} {r['time']:>8.2f} {r['time'] / r['floor']:>6.2f} | "
              f"{r['peak_mb']:>8.0f} {r['inputs_mb']:>9.0f}")
    times = {r["precision"]: r["time"] for r in rows}
    if "fp32" in times and "bf16" in times:
        print(f"bf16 speed-up over fp32 (same run): {times['fp32'] / times['bf16']:.2f}x")


if __name__ == "__main__":
    main()
