"""Benchmark: scoring images x captions with TERAN's MrSw alignment, against the GEMM floor.

    python benchmarks/bench_eval.py [--images 1000 --captions 5000 --regions 36 --words 12 --dim 1024]

Random unit vectors stand in for encoded regions and words. The floor is the FLOPs of the
region-word similarities alone, 2*Ni*Nc*R*W*d, divided by the GEMM rate this machine reaches on a
block-shaped matrix product; the ratio says how close the blocked scoring is to pure GEMM.
Peak memory is the process's peak RSS minus its RSS before the inputs were allocated.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import psutil
import torch

from teranprep.teran.scoring import score_matrix


def gemm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--image-block", type=int, default=100)
    p.add_argument("--caption-block", type=int, default=500)
    a = p.parse_args()

    rss0 = psutil.Process().memory_info().rss
    # Slot 0 (the global image vector) is part of every region set and never scored.
    regions = unit(a.images, a.regions + 1, a.dim, seed=0)
    words = unit(a.captions, a.words, a.dim, seed=1)
    region_lengths = torch.full((a.images,), a.regions + 1)
    word_lengths = torch.full((a.captions,), a.words)

    rate = gemm_rate(a.image_block * a.regions, a.dim, a.caption_block * a.words)
    t0 = time.perf_counter()
    scores = score_matrix(regions, region_lengths, words, word_lengths, mode="MrSw", drop_tokens="none",
                          image_block=a.image_block, caption_block=a.caption_block)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    flops = 2.0 * a.images * a.captions * a.regions * a.words * a.dim
    floor = flops / rate
    inputs = (regions.numel() + words.numel()) * 4
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'images':>8} {'captions':>8} {'R':>3} {'W':>3} {'d':>5} | {'GEMM GF/s':>9} "
          f"{'floor s':>8} {'time s':>8} {'ratio':>6} | {'peak MB':>8} {'inputs MB':>9}")
    print(f"{a.images:>8} {a.captions:>8} {a.regions:>3} {a.words:>3} {a.dim:>5} | {rate / 1e9:>9.1f} "
          f"{floor:>8.2f} {elapsed:>8.2f} {elapsed / floor:>6.2f} | {(peak - rss0) / 2**20:>8.0f} "
          f"{inputs / 2**20:>9.0f}")
    assert scores.shape == (a.images, a.captions)


if __name__ == "__main__":
    main()
