"""How far --precision bf16 drifts from fp32 on the same images: boxes, features, classes, R@1.

  full-size   butd-r101, random (calibrated) weights, N images at 600x1000: the detector's own
              selection (share of fp32 boxes with a bf16 box at IoU >= 0.95, cosine and class
              agreement of those pairs) and, on the fp32 boxes given to both (--given-boxes
              path), feature cosine and class agreement. Random weights give nearly tied
              class scores, so selection agreement here is a lower bound for trained weights.
  demo        the demo's trained butd-tiny detector on its synthetic images (`prep demo`,
              quick settings): the same figures, then the demo's TERAN model evaluated on the
              test split with bf16 features against fp32 features (R@1 both ways).

Usage: python benchmarks/bench_precision.py [--images 2] [--demo-dir DIR] [--skip-fullsize]
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


def box_iou(a, b):
    """(len(a), len(b)) IoU, continuous widths (x2 - x1)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-12)


def cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def compare(ref, other):
    """Pairs: each ref box with its best-IoU other box when IoU >= 0.95 (one-to-one, greedy)."""
    matched, cos, same_class, total = 0, [], [], 0
    for r, o in zip(ref, other):
        total += len(r.boxes)
        if not len(r.boxes) or not len(o.boxes):
            continue
        iou = box_iou(r.boxes, o.boxes)
        used = set()
        for i in np.argsort(-iou.max(1)):
            j = int(iou[i].argmax())
            if iou[i, j] >= 0.95 and j not in used:
                used.add(j)
                matched += 1
                cos.append(float(cosine(r.features[i:i + 1], o.features[j:j + 1])[0]))
                if r.class_ids is not None:
                    same_class.append(int(r.class_ids[i] == o.class_ids[j]))
    return {"matched": matched / max(total, 1), "cos_min": min(cos, default=float("nan")),
            "cos_mean": float(np.mean(cos)) if cos else float("nan"),
            "class_agree": float(np.mean(same_class)) if same_class else float("nan")}


def same_boxes(ref, other):
    """Given-box results (one-to-one rows): cosine and class agreement."""
    cos = np.concatenate([cosine(r.features, o.features) for r, o in zip(ref, other)])
    agree = np.concatenate([r.class_ids == o.class_ids for r, o in zip(ref, other)])
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "class_agree": float(agree.mean())}


def detector_drift(spec_kwargs, images):
    from teranprep.extractors.base import DetectorSpec
    from teranprep.extractors.butd.detector import ButdDetector
    out = {}
    fp32 = ButdDetector(DetectorSpec(**spec_kwargs, precision="fp32"))
    ref = fp32.detect(images)
    del fp32
    bf16 = ButdDetector(DetectorSpec(**spec_kwargs, precision="bf16"))
    out["selection"] = compare(ref, bf16.detect(images))
    given = bf16.detect(images, [r.boxes for r in ref])
    out["given_boxes"] = same_boxes(ref, given)
    return out


def fmt(d):
    parts = []
    if "matched" in d:
        parts.append(f"boxes matched at IoU>=0.95 {100 * d['matched']:.1f}%")
    parts.append(f"feature cosine min {d['cos_min']:.5f} mean {d['cos_mean']:.6f}")
    parts.append(f"class agreement {100 * d['class_agree']:.1f}%")
    return "; ".join(parts)


def demo_drift(demo_dir: Path, full: bool = False):
    from teranprep.pipeline.demo import DemoSettings, run_demo
    from teranprep.pipeline.evaluate import evaluate
    from teranprep.pipeline.extract import extract_regions
    from teranprep.pipeline.common.images import discover_images, read_image
    from teranprep.pipeline.splits import build_splits
    s = DemoSettings() if full else DemoSettings.quick()
    result = run_demo(demo_dir, s, echo=lambda *a, **k: None)
    images_dir = demo_dir / "synthetic" / "images"
    weights = demo_dir / "detector" / "model_final.pth"
    if not weights.is_file():
        weights = next((demo_dir / "detector").glob("*.pth"))
    spec = dict(model="butd-tiny", weights=str(weights), min_boxes=s.min_boxes, max_boxes=s.max_boxes,
                conf_thresh=s.conf_thresh)
    keys = [e.key for e in discover_images(images_dir)][:60]
    images = [read_image(images_dir / k)[0] for k in keys]
    torch.set_num_threads(1)  # what the demo's extraction used? threads differ only in rounding
    drift = detector_drift(spec, images)
    bf16_features = demo_dir / "features-bf16"
    extract_regions(images_dir, bf16_features, model="butd-tiny", weights=str(weights), device="cpu",
                    workers=0, min_boxes=s.min_boxes, max_boxes=s.max_boxes, conf_thresh=s.conf_thresh,
                    dtype="float32", precision="bf16", quiet=True, echo=lambda *a: None)
    captions = demo_dir / "synthetic" / "captions.json"
    splits_bf16 = demo_dir / "splits-bf16"
    build_splits(captions if captions.is_file() else next((demo_dir / "synthetic").glob("*.json")),
                 features=bf16_features, out=splits_bf16, echo=lambda *a: None)
    m16 = evaluate(demo_dir / "runs" / "demo", splits_bf16, split="test", device="cpu",
                   out=demo_dir / "eval-bf16", echo=lambda *a: None)
    drift["test_images"] = m16.get("n_images", s.test)
    drift["r1"] = {"fp32": (result.metrics["t2i"]["r1"], result.metrics["i2t"]["r1"]),
                   "bf16": (m16["t2i"]["r1"], m16["i2t"]["r1"])}
    return drift


def main():
    from bench_detector import test_images
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--demo-dir", type=Path)
    p.add_argument("--skip-fullsize", action="store_true")
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--full-demo", action="store_true",
                   help="the full demo (600 images, 101 test; ~12 min) instead of the quick one")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    if not args.skip_fullsize:
        t = time.perf_counter()
        d = detector_drift(dict(model="butd-r101", random_seed=0), test_images(args.images))
        print(f"\nbutd-r101 random weights, {args.images} images 600x1000 ({time.perf_counter() - t:.0f} s):")
        print(f"  own selection: {fmt(d['selection'])}")
        print(f"  same boxes:    {fmt(d['given_boxes'])}")
    if not args.skip_demo:
        t = time.perf_counter()
        own = None if args.demo_dir else Path(tempfile.mkdtemp(prefix="bench-precision-"))
        try:
            d = demo_drift(args.demo_dir or own, args.full_demo)
        finally:
            if own is not None:
                shutil.rmtree(own, ignore_errors=True)
        kind = "full" if args.full_demo else "quick"
        print(f"\n{kind} demo (trained butd-tiny, 60 of its synthetic images; {time.perf_counter() - t:.0f} s):")
        print(f"  own selection: {fmt(d['selection'])}")
        print(f"  same boxes:    {fmt(d['given_boxes'])}")
        (a, b), (c, e) = d["r1"]["fp32"], d["r1"]["bf16"]
        print(f"  test R@1 text->image / image->text: fp32 features {a:.1f} / {b:.1f}, "
              f"bf16 features {c:.1f} / {e:.1f} (same TERAN model, trained on fp32 features; "
              f"{d['test_images']} test images)")


if __name__ == "__main__":
    main()
