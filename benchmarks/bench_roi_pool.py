"""BUTD's inference ROI pooling on its own: ops.RoiMaxPool against torchvision's roi_pool kernel
(Caffe's ROIPooling, what training and MILVLG use) and, with --baseline, against the
`roi_max_pool` of another ops.py (an older commit's, checked out anywhere), on the 300 proposals
the random-weight butd-r101 makes for bench_detector's images.

  per image   RoiMaxPool built once for the image's boxes, then pooled 16 ROIs at a time (as
              roi_features runs it: ROI_CHUNK, each chunk dropped before the next, as res5 takes
              it); torchvision and the baseline on all 300 at once
  equal       every result compared bit for bit with torchvision's (a max rounds nothing)

Usage: python benchmarks/bench_roi_pool.py [--images 3] [--precisions fp32,bf16] [--repeats 3]
       [--baseline /path/to/old/src/teranprep/extractors/butd/ops.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_detector as bd  # noqa: E402  (its test images)


def median_ms(f, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="an ops.py whose roi_max_pool(feature, boxes, output, "
                                                  "scale, nonnegative) to time alongside")
    a = p.parse_args()
    from teranprep.extractors import build_detector
    from teranprep.extractors.base import DetectorSpec
    from teranprep.extractors.butd.detector import ROI_CHUNK
    from teranprep.extractors.butd.ops import RoiMaxPool
    from teranprep.extractors.precision import cpu_description
    from teranprep.pipeline.common.distribute import machine_cores
    baseline = None
    if a.baseline:
        spec = importlib.util.spec_from_file_location("baseline_ops", a.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    torch.set_num_threads(machine_cores())
    print(f"CPU: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    images = bd.test_images(a.images)
    for precision in a.precisions.split(","):
        det = build_detector(DetectorSpec(model="butd-r101", random_seed=0, device="cpu",
                                          precision=precision, options=()))
        model, rows = det.model, {"RoiMaxPool": [], "torchvision roi_pool": [], "baseline": []}
        with torch.inference_mode():
            for image in images:
                x, scale = det._prepare(image)
                res4 = model.backbone(x)
                boxes, _ = model.proposals(model.rpn_raw(res4), x.shape[-2:], scale)
                r, s = model.cfg.pooler_resolution, 1.0 / model.cfg.feature_stride
                expected = torchvision.ops.roi_pool(res4.float(), [boxes], (r, r), s).to(res4.dtype)

                def ours():  # each chunk is res5's input, freed before the next (no concatenation)
                    pool = RoiMaxPool(res4, boxes, r, s)
                    return [pool(i, i + ROI_CHUNK) for i in range(0, len(boxes), ROI_CHUNK)]

                assert torch.equal(torch.cat(ours()), expected), "RoiMaxPool differs from torchvision's roi_pool"
                rows["RoiMaxPool"].append(median_ms(ours, a.repeats))
                rows["torchvision roi_pool"].append(median_ms(
                    lambda: torchvision.ops.roi_pool(res4.float(), [boxes], (r, r), s), a.repeats))
                if baseline is not None:
                    assert torch.equal(baseline.roi_max_pool(res4, boxes, r, s), expected)
                    rows["baseline"].append(median_ms(lambda: baseline.roi_max_pool(res4, boxes, r, s),
                                                      a.repeats))
        ours_ms = statistics.mean(rows["RoiMaxPool"])
        for name, ms in rows.items():
            if ms:
                print(f"{precision} {name:22s} {statistics.mean(ms):8.1f} ms/image ({len(boxes)} proposals; "
                      f"{statistics.mean(ms) / ours_ms:.2f}x RoiMaxPool's time); per image "
                      + " ".join(f"{m:.1f}" for m in ms), flush=True)


if __name__ == "__main__":
    main()
