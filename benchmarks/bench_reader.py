"""Benchmark: FeatureStore reads (single key and get_many) against copying the same rows in numpy.

    python benchmarks/bench_reader.py [--images 20000 --shard-size 1000 --regions 36 --dim 2048]
        [--workdir DIR] [--keep]

Writes a features/ directory of float16 shards with ShardWriter (the same layout extract-regions
writes; ~3 GB at the defaults) into a temporary directory, reads every shard once so the page
cache is warm, then times, in one run and in the same random key order:
  numpy   rows of an in-memory (n, R, D) array copied out one image at a time (the floor);
  single  store[key] for every key;
  features store.features(key) (the training path: no boxes, no class columns);
  get_many store.get_many(batch) over batches of --batch keys.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from teranprep.manifests.build import write_shard
from teranprep.manifests.features import FeatureStore, SHARDS_DIR, write_index_and_manifest
from teranprep.manifests.shards import Regions, shard_name


def build(root: Path, n_images: int, shard_size: int, regions: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((shard_size + regions, dim)).astype(np.float16)
    boxes = rng.uniform(0, 500, (regions, 4)).astype(np.float32)
    rows, stats = [], []
    for s, start in enumerate(range(0, n_images, shard_size)):
        items = [Regions(f"img{i:07d}.jpg", 640, 480, boxes,
                         pool[(i - start):(i - start) + regions],
                         class_ids=np.arange(regions, dtype=np.int32),
                         class_scores=np.ones(regions, np.float32))
                 for i in range(start, min(n_images, start + shard_size))]
        st = write_shard(root / SHARDS_DIR / shard_name(s), items, feature_dim=dim, dtype="float16",
                         attrs={"detector": "bench"}, columns=("class_ids", "class_scores"))
        rows += st.pop("rows")
        stats.append(st)
    write_index_and_manifest(root, stage="bench", rows=rows, shard_stats=stats, parameters={},
                             parameters_fingerprint="bench", detector={"name": "bench"},
                             feature_dim=dim, dtype="float16", input_info={}, timings={})


def warm(root: Path) -> None:
    for path in sorted((root / SHARDS_DIR).glob("*.h5")):
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


def rate(n: int, fn) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256, help="keys per get_many call")
    p.add_argument("--numpy-images", type=int, default=5000,
                   help="rows held in RAM for the numpy reference (copy speed does not depend on it)")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-reader-", dir=a.workdir))
    try:
        t0 = time.perf_counter()
        build(work, a.images, a.shard_size, a.regions, a.dim)
        built = time.perf_counter() - t0
        warm(work)
        order = np.random.default_rng(1).permutation(a.images)
        store = FeatureStore(work)
        keys = [f"img{i:07d}.jpg" for i in order]
        n_ref = min(a.numpy_images, a.images)
        reference = np.random.default_rng(2).standard_normal((n_ref, a.regions, a.dim)).astype(np.float16)
        ref_order = order % n_ref

        def numpy_copy():
            for i in ref_order:
                reference[i].copy()

        def single():
            for key in keys:
                store[key]

        def features_only():
            for key in keys:
                store.features(key)

        def many():
            for b in range(0, len(keys), a.batch):
                store.get_many(keys[b:b + a.batch])

        def many_features():
            for b in range(0, len(keys), a.batch):
                store.get_many(keys[b:b + a.batch], names=("features", "boxes"))

        store[keys[0]]  # open every shard once before timing
        store.get_many(keys[:a.images // a.shard_size * 2])
        rows = [("numpy copy of the same rows", rate(len(keys), numpy_copy)),
                ("store[key], random keys", rate(len(keys), single)),
                ("store.features(key)", rate(len(keys), features_only)),
                (f"store.get_many({a.batch} keys)", rate(len(keys), many)),
                (f"get_many({a.batch}, names=(features, boxes))", rate(len(keys), many_features))]
        size = sum(p.stat().st_size for p in (work / SHARDS_DIR).glob("*.h5"))
        print(f"machine: {platform.machine()}, {psutil.cpu_count()} cpus; {a.images} images in "
              f"{-(-a.images // a.shard_size)} shards, {a.regions} x {a.dim} float16, "
              f"{size / 2**30:.2f} GiB written in {built:.0f} s")
        floor = rows[0][1]
        print(f"{'read':<44} {'images/s':>10} {'vs numpy':>9}")
        for name, value in rows:
            print(f"{name:<44} {value:>10,.0f} {value / floor:>9.2f}")
        store.close()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
