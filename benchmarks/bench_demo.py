"""`prep demo` timed stage by stage: wall seconds per stage, detector mAP, test-split recalls.

    python benchmarks/bench_demo.py [--out DIR] [--quick] [--images N] [--seed S]

Runs the demo into a fresh directory (deleted first), then prints one table of stage times and
one of recalls, the CPU model and date, and whether the demo's own bar (DemoSettings.min_r1 /
min_map, what `prep demo` checks) and the 900 s budget were met.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def cpu_model() -> str:
    """lscpu's model name (what benchmarks/README.md names beside each figure)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from teranprep.pipeline.demo import DemoSettings, check_demo_targets, run_demo
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    if args.images:
        settings.images = args.images
    settings.seed = args.seed
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    if out.exists():
        shutil.rmtree(out)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = run_demo(out, settings, echo=lambda line: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load_after = os.getloadavg()
    print(f"\nprep demo ({'quick' if args.quick else 'full'}: {settings.images} images, "
          f"{result.metrics['n_images']} test) -> {out}")
    print("| stage | wall s | share |\n|---|---|---|")
    for name, info in result.stages.items():
        print(f"| {name} | {info['wall_s']:.1f} | {info['wall_s'] / wall:.2f} |")
    print(f"| total | {wall:.1f} | 1.00 |")
    print(f"\nprocess CPU s {cpu:.0f} (CPU/wall {cpu / wall:.2f}); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; load average "
          f"before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print(f"budget 900 s: {'met' if wall <= 900 else 'MISSED'} ({wall / 900:.2f} of it)")
    print(f"# {cpu_model()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, seed {args.seed}")
    print(f"detector validation mAP@0.5: {result.detector_map:.3f}\n")
    print(result.recall_table())
    problems = check_demo_targets(result, settings.min_r1, settings.min_map)
    print("targets: " + ("all met" if not problems else "; ".join(problems)))


if __name__ == "__main__":
    main()
