"""extract-regions throughput: the whole stage against the detector alone, and 1 vs 2 workers.

Two runs, each printed as a table with ratios measured in the same process:
  decode-bound  tv-frcnn-mbv3-320 (random weights) on many small JPEGs: 1 vs 2 dask workers
  real-size     a full-size model on a few 640x480 images: share of wall time spent outside
                the detector (decode, HDF5 writes, index/manifest, scheduling, start-up)

    python benchmarks/bench_extract.py [--small N] [--large N] [--large-model NAME]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from teranprep.extractors import DetectorSpec, build_detector
from teranprep.pipeline.extract import extract_regions
from teranprep.pipeline.common.images import discover_images, read_image


def make_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse([x, y, x + 40, y + 30], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(root / f"{i:05d}.jpg", quality=90)


def detector_alone(images: Path, model: str, batch_size: int, threads: int) -> float:
    """Seconds for build + detect on already-decoded images, same batches as the stage."""
    torch.set_num_threads(threads)
    decoded = [read_image(images / e.key)[0] for e in discover_images(images)]
    t0 = time.perf_counter()
    detector = build_detector(DetectorSpec(model=model, random_seed=0, device="cpu"))
    for i in range(0, len(decoded), batch_size):
        detector.detect(decoded[i:i + batch_size])
    return time.perf_counter() - t0


def stage(images: Path, out: Path, model: str, workers: int, batch_size: int, shard_size: int,
          threads: int = 1) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    extract_regions(images, out, model=model, random_weights=0, workers=workers, device="cpu",
                    batch_size=batch_size, shard_size=shard_size, threads_per_worker=threads,
                    quiet=True, echo=lambda *_: None)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=400, help="images in the decode-bound run")
    parser.add_argument("--large", type=int, default=8, help="images in the real-size run")
    parser.add_argument("--large-model", default="tv-frcnn-r50-fpn")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"date {time.strftime('%Y-%m-%d')}")
    try:
        small = work / "small"
        make_images(small, args.small, (240, 320))
        bs, shard = 4, 25
        det = detector_alone(small, "tv-frcnn-mbv3-320", bs, threads=1)
        w1 = stage(small, work / "o1", "tv-frcnn-mbv3-320", 1, bs, shard)
        w2 = stage(small, work / "o2", "tv-frcnn-mbv3-320", 2, bs, shard)
        n = args.small
        print(f"\ndecode-bound: tv-frcnn-mbv3-320, {n} JPEGs 320x240, batch {bs}, shards of {shard}, "
              "1 torch thread per worker")
        print(f"{'run':34s} {'wall s':>8s} {'images/s':>9s}")
        for name, secs in [("detector alone (1 thread)", det), ("stage, 1 worker", w1), ("stage, 2 workers", w2)]:
            print(f"{name:34s} {secs:8.1f} {n / secs:9.1f}")
        print(f"ratio 2 workers / 1 worker images/s: {w1 / w2:.2f}x   (target >= 1.6x)")
        print(f"stage overhead outside the detector, 1 worker: {100 * (w1 - det) / w1:.1f}% of wall")
        if args.skip_large:
            return
        large = work / "large"
        make_images(large, args.large, (480, 640), seed=1)
        threads = os.cpu_count() or 1
        det_l = detector_alone(large, args.large_model, 2, threads=threads)
        st_l = stage(large, work / "ol", args.large_model, 1, 2, 1000, threads=threads)
        print(f"\nreal-size: {args.large_model}, {args.large} JPEGs 640x480, batch 2, 1 worker with "
              f"{threads} torch threads")
        print(f"{'run':34s} {'wall s':>8s} {'s/image':>9s}")
        print(f"{'detector alone (build + detect)':34s} {det_l:8.1f} {det_l / args.large:9.2f}")
        print(f"{'whole stage':34s} {st_l:8.1f} {st_l / args.large:9.2f}")
        print(f"outside the detector: {100 * (st_l - det_l) / st_l:.1f}% of the stage's wall time "
              "(target <= 15%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
