"""import-features scan-precomp memory: peak RSS of importing a ~2 GB {split}_ims.npy.

Generates train_ims.npy (N x 36 x 2048 float32, written in chunks through np.lib.format.open_memmap)
with train_ids.txt, then measures the peak RSS (ru_maxrss of the child) of three subprocesses:
  baseline  a Python that imports what `prep import-features` imports (numpy, h5py, pandas, pyarrow, the CLI) and exits
  import    `prep import-features scan-precomp SRC OUT --quiet`, the stage itself
  memmap    for comparison: one pass over the same array through np.load(mmap_mode="r")
Everything generated is deleted at the end (unless --keep).

    python benchmarks/bench_import.py [--gb 2.0] [--shard-size 1000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K, D = 36, 2048

CHILDREN = {
    "baseline": "import numpy, h5py, pandas, pyarrow.parquet, teranprep.cli, teranprep.pipeline.formats",
    "import": "import sys; from teranprep.cli import main; main(args=sys.argv[1:])",
    "memmap": ("import numpy as np, sys\n"
               "a = np.load(sys.argv[1] + '/train_ims.npy', mmap_mode='r')\n"
               "s = 0.0\n"
               "for i in range(0, len(a), 256):\n"
               "    s += float(a[i:i + 256].sum())\n"
               "print(s)"),
}


def generate(src: Path, n: int, seed: int = 0, chunk: int = 256) -> None:
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ims = np.lib.format.open_memmap(src / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, K, D))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ims[start:stop] = rng.standard_normal((stop - start, K, D), dtype=np.float32)
        ims.flush()
    del ims
    # Ids in an order that is not the sorted order, so the import reads rows out of file order.
    ids = [f"{(i * 7919) % 1000003:07d}" for i in range(n)]
    (src / "train_ids.txt").write_text("".join(f"{i}\n" for i in ids))


def child_peak_rss(code: str, *args) -> tuple[float, float, str]:
    """(peak RSS in MB, wall seconds, stdout) of `python -c code args`, from the child's own
    rusage (os.wait4), so one child's peak never hides another's."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"child failed:\n{err.read()}")
        return usage.ru_maxrss / 1024, wall, out.read().strip()  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--dir", default=None, help="where to generate (default: a temp dir)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--generate", nargs=2, metavar=("DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    n = int(args.gb * 1e9 // (K * D * 4))
    work = Path(tempfile.mkdtemp(prefix="bench_import-", dir=args.dir))
    try:
        t = time.perf_counter()
        # A child generates the array: on Linux a child's ru_maxrss starts from the high-water
        # mark of the process it was spawned from, so this process must never hold much.
        subprocess.run([sys.executable, __file__, "--generate", str(work / "src"), str(n)], check=True)
        size = (work / "src/train_ims.npy").stat().st_size
        print(f"generated {n} x {K} x {D} float32 = {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
        results = {}
        results["baseline"] = child_peak_rss(CHILDREN["baseline"])
        results["import"] = child_peak_rss(CHILDREN["import"], "import-features", "scan-precomp",
                                           work / "src", work / "features", "--shard-size",
                                           args.shard_size, "--quiet")
        print(results["import"][2])
        out_bytes = sum(p.stat().st_size for p in (work / "features").rglob("*") if p.is_file())
        _spot_check(work)
        results["memmap"] = child_peak_rss(CHILDREN["memmap"], work / "src")
        import resource
        print(f"(this driver's own peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
        print(f"\nmachine: {platform.node()} {platform.machine()}, Python {platform.python_version()}, "
              f"numpy {np.__version__}")
        print(f"{'process':<10} {'peak RSS MB':>12} {'wall s':>8}")
        for name, (rss, wall, _) in results.items():
            print(f"{name:<10} {rss:12.0f} {wall:8.1f}")
        rss, wall, _ = results["import"]
        print(f"import: {n / wall:.0f} images/s, {size / wall / 1e6:.0f} MB/s read, output "
              f"{out_bytes / 1e9:.2f} GB; peak RSS {rss:.0f} MB = {rss / (size / 2**20):.3f} x the "
              f"array; {rss - results['baseline'][0]:.0f} MB above the import-only baseline; "
              f"memmap pass / import = {results['memmap'][0] / rss:.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _spot_check(work: Path) -> None:
    """A few imported images equal their rows in the source (the benchmark measures a correct run)."""
    from teranprep.manifests.features import FeatureStore
    ims = np.load(work / "src/train_ims.npy", mmap_mode="r")
    ids = (work / "src/train_ids.txt").read_text().split()
    with FeatureStore(work / "features") as store:
        assert len(store) == len(ids)
        for row in (0, len(ids) // 2, len(ids) - 1):
            np.testing.assert_array_equal(store[ids[row]].features, ims[row])
    print("spot check: 3 rows identical to the source")


if __name__ == "__main__":
    main()
