"""The ROUGE-L relevance matrix of a COCO-5K-sized split, against the original's per-pair Python.

    .venv/bin/python benchmarks/bench_relevance.py [--images 5000 --per-image 5 --workers 2]

Writes a splits/ directory with one test split of IMAGES x PER_IMAGE generated captions (COCO's
length distribution: 8 + Poisson(2.5) words, mean 10.5, a Zipf vocabulary of 10,000 words plus
frequent glue words), then, each in a child process so its peak RSS is its own:
  1. ensure_rouge_matrix in one process (the default of `prep eval`),
  2. the same on a local dask cluster of --workers processes (`prep eval --workers N`),
and in this process a pure-Python per-pair ROUGE-L written in the style of mesnico/TERAN's
evaluate_utils/rouge.py (a full DP table per pair, max precision and recall over 5 references)
on a sample of captions x all images, extrapolated to the whole matrix. The sample's values are
checked against the matrix. Prints a table; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GLUE = ("a", "the", "on", "in", "of", "with", "next", "to", "and", "is", "an", "at", "two")


def make_captions(n: int, seed: int = 0, n_types: int = 10_000) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(n_types)])
    p = 1.0 / np.arange(1, n_types + 1) ** 1.05
    p /= p.sum()
    lengths = 8 + rng.poisson(2.5, n)
    out = []
    for length in lengths.tolist():
        words = [str(rng.choice(GLUE)) if rng.random() < 0.35 else str(vocab[rng.choice(n_types, p=p)])
                 for _ in range(length)]
        out.append(" ".join(words).capitalize() + rng.choice([".", ""]))
    return out


def write_split(root: Path, n_images: int, per_image: int) -> Path:
    import pandas as pd
    from teranprep.manifests.atomic import canonical_json
    from teranprep.manifests.splits import SPLITS_FORMAT, SPLITS_FORMAT_VERSION
    splits = root / "splits"
    splits.mkdir(parents=True)
    captions = make_captions(n_images * per_image)
    keys = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(n_images) for _ in range(per_image)]
    pd.DataFrame({"image_key": keys, "caption_id": np.arange(len(keys)), "raw": captions}).to_parquet(
        splits / "test.parquet", index=False)
    (splits / "manifest.json").write_bytes(canonical_json(
        {"format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION, "bench": True}))
    return splits


CHILD = """
import json, resource, sys, time
from teranprep.pipeline.relevance import ensure_rouge_matrix
t0 = time.perf_counter()
path = ensure_rouge_matrix(sys.argv[1], "test", cache_dir=sys.argv[2], workers=int(sys.argv[3]),
                           echo=lambda m: print(m, file=sys.stderr))
print(json.dumps({"seconds": time.perf_counter() - t0, "path": str(path),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(splits: Path, cache: Path, workers: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(splits), str(cache), str(workers)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def original_style_lcs(a: list, b: list) -> int:
    """LCS as the original computes it: a full (len+1) x (len+1) table of Python lists."""
    if len(a) < len(b):
        a, b = b, a
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for j in range(1, len(b) + 1):
        for i in range(1, len(a) + 1):
            if a[i - 1] == b[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table[len(a)][len(b)]


def original_style_rouge(candidate: str, references: list[str], beta: float = 1.2) -> float:
    cand = candidate.lower().split(" ")
    precision, recall = [], []
    for reference in references:
        ref = reference.lower().split(" ")
        lcs = original_style_lcs(ref, cand)
        precision.append(lcs / float(len(cand)))
        recall.append(lcs / float(len(ref)))
    p, r = max(precision), max(recall)
    return ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p) if p and r else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sample", type=int, default=8, help="captions for the per-pair baseline")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-relevance-"))
    splits = write_split(work, args.images, args.per_image)
    import pandas as pd
    frame = pd.read_parquet(splits / "test.parquet")
    captions, keys = frame["raw"].tolist(), frame["image_key"].tolist()
    n_captions, n_images = len(captions), args.images
    lengths = np.array([len(c.split(" ")) for c in captions])
    print(f"{n_captions} captions x {n_images} images; words per caption mean {lengths.mean():.2f}, "
          f"min {lengths.min()}, max {lengths.max()}; load average {os.getloadavg()[0]:.1f}")

    rows = []
    inline = run_child(splits, work / "rel-inline", 0)
    rows.append(("ensure_rouge_matrix, 1 process", inline["seconds"], inline["peak_mb"]))
    if args.workers:
        dask = run_child(splits, work / "rel-dask", args.workers)
        rows.append((f"same, local dask cluster of {args.workers} workers", dask["seconds"],
                     dask["peak_mb"]))
        same = Path(dask["path"]).read_bytes() == Path(inline["path"]).read_bytes()
    matrix = np.memmap(inline["path"], dtype=np.float32, mode="r", shape=(n_captions, n_images))

    by_image = {}
    for caption, key in zip(captions, keys):
        by_image.setdefault(key, []).append(caption)
    references = list(by_image.values())
    sample = np.random.default_rng(1).choice(n_captions, args.sample, replace=False)
    t0 = time.perf_counter()
    worst = 0.0
    for i in sample:
        values = [original_style_rouge(captions[i], refs) for refs in references]
        worst = max(worst, float(np.abs(np.asarray(values, np.float32) - matrix[i]).max()))
    per_row = (time.perf_counter() - t0) / len(sample)
    python_total = per_row * n_captions
    rows.append((f"original-style per-pair Python ({len(sample)} rows, extrapolated)", python_total, None))

    print(f"\n| run | seconds | peak RSS MB |\n|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {'' if peak is None else f'{peak:.0f}'} |")
    print(f"\nper-pair Python: {per_row * 1000:.0f} ms per caption row ({n_images} images x "
          f"{args.per_image} references); whole matrix {python_total / 3600:.2f} h")
    print(f"speed-up over per-pair Python: {python_total / inline['seconds']:.0f}x (1 process)"
          + (f", {python_total / dask['seconds']:.0f}x (dask)" if args.workers else ""))
    print(f"sample vs matrix: max |difference| {worst:.2e}"
          + (f"; dask matrix byte-identical to the in-process one: {same}" if args.workers else ""))
    if not args.workdir:  # a folder of its own: the matrices are ~n_captions x n_images x 4 bytes each
        del matrix
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
