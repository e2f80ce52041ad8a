"""Benchmark: extract-regions and FeatureStore reads, local disk against a local S3 server.

    python benchmarks/bench_storage.py [--images 48 --shard-size 8 --reader-images 4000 --dim 2048]

Starts moto's S3 server on 127.0.0.1 (the real s3fs / botocore client talks to it over TCP;
it stands in for an object store on a fast network, with none of a real one's latency) and
times, in one process:
  extract  `extract_regions` (butd-tiny, random weights, --workers 0) over synthetic images:
           folder -> local features/, and images prefix in the bucket -> features/ in the bucket;
           the upload share is the time the workers spent in PUTs over the stage's wall time;
  reader   FeatureStore over a float16 features/ folder (36 regions x --dim per image): every
           key in random order, read from local disk (page cache warm) and from the bucket
           through the shard cache, first (cold: whole shards fetched and sha256-checked) and
           second pass (warm: the cache is a local disk).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _images(root: Path, n: int) -> None:
    from PIL import Image
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(root / f"img{i:04d}.jpg")


def _upload(fs, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/{path.relative_to(local).as_posix()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--reader-images", type=int, default=4000)
    parser.add_argument("--reader-shard-size", type=int, default=500)
    parser.add_argument("--dim", type=int, default=2048)
    args = parser.parse_args()

    import logging
    import s3fs
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "TERANPREP_CACHE_DIR": str(work / "cache")})
    from teranprep.manifests import FeatureStore, remote
    remote.set_storage_options({"endpoint_url": endpoint})
    fs = s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir("bench")
    print(f"CPU: {_cpu()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    t_start = time.perf_counter()

    # ---- extract
    from teranprep.pipeline.extract import extract_regions
    _images(work / "images", args.images)
    _upload(fs, work / "images", "bench/images")
    settings = dict(model="butd-tiny", random_weights=0, workers=0, shard_size=args.shard_size,
                    batch_size=2, quiet=True, threads_per_worker=1)
    extract_regions(work / "images", work / "warm-up", **{**settings, "limit": 4})  # imports, first build
    uploads = []
    original = remote.put_file

    def timed_put(local, url):
        t0 = time.perf_counter()
        original(local, url)
        uploads.append(time.perf_counter() - t0)

    remote.put_file = timed_put
    local_runs, s3_runs, shares = [], [], []
    for round_ in range(2):  # alternated, so the machine's load falls on both alike
        t = time.perf_counter()
        extract_regions(work / "images", work / f"features-local-{round_}", **settings)
        local_runs.append(time.perf_counter() - t)
        uploads.clear()
        t = time.perf_counter()
        extract_regions("s3://bench/images/", f"s3://bench/features-{round_}", **settings)
        s3_runs.append(time.perf_counter() - t)
        shares.append(sum(uploads) / s3_runs[-1])
    remote.put_file = original
    print(f"extract  {args.images} images, shards of {args.shard_size} (butd-tiny, 1 thread), two "
          f"alternated rounds: local {', '.join(f'{args.images / x:.2f}' for x in local_runs)} images/s; "
          f"s3 {', '.join(f'{args.images / x:.2f}' for x in s3_runs)} images/s; shard uploads "
          f"{', '.join(f'{100 * x:.1f}%' for x in shares)} of the s3 run")

    # ---- reader
    from teranprep.manifests.build import write_shard
    from teranprep.manifests.features import SHARDS_DIR, write_index_and_manifest
    from teranprep.manifests.shards import Regions, shard_name
    rng = np.random.default_rng(0)
    regions = 36
    pool = rng.standard_normal((args.reader_shard_size + regions, args.dim)).astype(np.float16)
    boxes = rng.uniform(0, 500, (regions, 4)).astype(np.float32)
    root = work / "reader"
    rows, stats = [], []
    for s, start in enumerate(range(0, args.reader_images, args.reader_shard_size)):
        items = [Regions(f"img{i:07d}.jpg", 640, 480, boxes, pool[(i - start):(i - start) + regions])
                 for i in range(start, min(args.reader_images, start + args.reader_shard_size))]
        st = write_shard(root / SHARDS_DIR / shard_name(s), items, feature_dim=args.dim, dtype="float16",
                         attrs={"detector": "bench"}, columns=())
        rows += st.pop("rows")
        stats.append(st)
    write_index_and_manifest(root, stage="bench", rows=rows, shard_stats=stats, parameters={},
                             parameters_fingerprint="bench", detector={"name": "bench"},
                             feature_dim=args.dim, dtype="float16", input_info={}, timings={})
    _upload(fs, root, "bench/reader")
    size_mb = sum(p.stat().st_size for p in (root / SHARDS_DIR).glob("*.h5")) / 1e6

    def read_all(location) -> float:
        with FeatureStore(location) as store:
            keys = store.keys()
            order = np.random.default_rng(1).permutation(len(keys))
            t0 = time.perf_counter()
            for i in order:
                store.features(keys[i])
            return len(keys) / (time.perf_counter() - t0)

    read_all(root)  # page cache warm
    local_rate = read_all(root)
    cold = read_all("s3://bench/reader")
    warm = read_all("s3://bench/reader")
    local_rate = max(local_rate, read_all(root))
    warm = max(warm, read_all("s3://bench/reader"))
    print(f"reader   {args.reader_images} images x {regions} x {args.dim} float16 ({size_mb:.0f} MB in "
          f"{len(stats)} shards), random order: local {local_rate:.0f} images/s; s3 first pass "
          f"{cold:.0f} images/s (shards fetched whole + sha256); s3 later passes {warm:.0f} images/s")
    print(f"load average at the end {os.getloadavg()[0]:.2f}; {time.perf_counter() - t_start:.0f} s in all")
    server.stop()


if __name__ == "__main__":
    sys.exit(main())
