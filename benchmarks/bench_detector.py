"""BUTD detector speed on CPU at 600x1000: seconds per image by stage, ratio to the FLOP floor.

  stages     backbone (stem..res4), RPN (head + proposals), ROI head (ROIPool + res5 + predictors
             on the proposals), selection (per-class NMS + box policy), from ButdDetector.timings
  floor      the model's FLOPs for this input and 300 proposals (counted with hooks on a meta-device
             copy: no compute) over the conv rate this script measures on the same machine
  compare    tv-frcnn-r50-fpn and butd-tiny on the same images in the same run
  --gpu      images/s on CUDA in fp32 and bf16 autocast, and the bf16 feature drift

Random weights (calibrated, so activations are realistic in scale): speed does not depend on them.
Usage: python benchmarks/bench_detector.py [--images 2] [--threads 2] [--gpu]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn


def test_images(n, h=600, w=1000, seed=0):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        base = np.stack([(xs * rng.uniform(0.1, 0.3)) % 255, (ys * rng.uniform(0.1, 0.3)) % 255,
                         ((xs + ys) * 0.2) % 255], -1)
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def count_flops(cfg, image_hw=(600, 1000), proposals=300):
    """FLOPs (2 x MACs) of convs and linears per stage, on a meta-device model."""
    from teranprep.extractors.butd.model import ButdModel
    with torch.device("meta"):
        model = ButdModel(cfg)
    counts = {"backbone": 0, "rpn": 0, "roi_head": 0}
    current = ["backbone"]

    def hook(module, args, out):
        if isinstance(module, nn.Conv2d):
            macs = out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            macs = out.numel() * module.in_features
        counts[current[0]] += 2 * macs

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        res4 = model.backbone(torch.empty(1, 3, *image_hw, device="meta"))
        current[0] = "rpn"
        model.proposal_generator.rpn_head(res4)
        current[0] = "roi_head"
        r = cfg.pooler_resolution
        feats = model.roi_heads.res5(torch.empty(proposals, res4.shape[1], r, r, device="meta")).mean(dim=(2, 3))
        model.roi_heads.box_predictor.cls_score(feats)
        model.roi_heads.box_predictor.bbox_pred(feats)
    return counts


def conv_rate(reps=3):
    """Sustained FLOP/s of a res5-like 3x3 conv (512 -> 512 at 14x14, batch 32)."""
    conv = nn.Conv2d(512, 512, 3, padding=2, dilation=2, bias=False).eval()
    x = torch.randn(32, 512, 14, 14)
    flops = 2 * 32 * 512 * 14 * 14 * 512 * 9
    with torch.no_grad():
        conv(x)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    return flops / best


def bench_butd(name, images, device="cpu"):
    from teranprep.extractors.base import DetectorSpec
    from teranprep.extractors.butd.detector import ButdDetector
    det = ButdDetector(DetectorSpec(model=name, random_seed=0, device=device))
    n_props = []
    orig = det.model.proposals

    def counting(*a, **k):
        boxes, scores = orig(*a, **k)
        n_props.append(len(boxes))
        return boxes, scores

    det.model.proposals = counting
    t = time.perf_counter()
    det.detect(images)
    wall = time.perf_counter() - t
    per = {k: v / len(images) for k, v in det.timings.items()}
    return det, wall / len(images), per, n_props


def bench_tv(images):
    from teranprep.extractors.base import DetectorSpec
    from teranprep.extractors.torchvision_frcnn import TorchvisionFasterRCNN
    det = TorchvisionFasterRCNN(DetectorSpec(model="tv-frcnn-r50-fpn", random_seed=0))
    t = time.perf_counter()
    det.detect(images)
    return (time.perf_counter() - t) / len(images)


def bench_gpu(n=8):
    from teranprep.extractors.base import DetectorSpec
    from teranprep.extractors.butd.detector import ButdDetector
    images = test_images(n, seed=1)
    det = ButdDetector(DetectorSpec(model="butd-r101", random_seed=0, device="cuda"))
    det.detect(images[:1])
    out = {}
    feats = {}
    for mode in ("fp32", "bf16"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            res = [det.detect_one(im, None) for im in images]
        torch.cuda.synchronize()
        out[mode] = n / (time.perf_counter() - t)
        feats[mode] = res
    # drift on the same boxes: fp32 boxes fed to the bf16 model in given-box mode
    drift_abs, cos = 0.0, []
    for im, r32 in zip(images, feats["fp32"]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            r16 = det.detect_one(im, r32.boxes)
        a, b = r32.features, r16.features
        drift_abs = max(drift_abs, float(np.abs(a - b).max()))
        cos.append(float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).min()))
    return out, drift_abs, min(cos), torch.cuda.get_device_name()


def main():
    from teranprep.extractors.butd.config import get_config
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, torch threads "
          f"{args.threads}, torch {torch.__version__}")
    if not args.skip_cpu:
        images = test_images(args.images)
        rate = conv_rate()
        flops = count_flops(get_config("butd-r101"))
        total_flops = sum(flops.values())
        print(f"conv rate: {rate / 1e9:.1f} GFLOP/s; BUTD r101 FLOPs at 600x1000 + 300 proposals: "
              + ", ".join(f"{k} {v / 1e12:.3f} T" for k, v in flops.items()) + f", total {total_flops / 1e12:.3f} T")
        _, wall, per, n_props = bench_butd("butd-r101", images)
        sel_share = per["selection_s"] / sum(per.values())
        print(f"\nbutd-r101 (CPU, {args.images} images 600x1000, proposals {n_props}): {wall:.2f} s/image")
        for k, v in per.items():
            print(f"  {k:12s} {v:8.3f} s  {100 * v / sum(per.values()):5.1f}%")
        floor = total_flops / rate
        print(f"  FLOP floor {floor:.2f} s -> ratio {wall / floor:.2f}x; selection share {100 * sel_share:.2f}% "
              f"({'under' if sel_share < 0.03 else 'OVER'} 3%)")
        _, tiny_wall, _, _ = bench_butd("butd-tiny", images)
        print(f"butd-tiny: {tiny_wall:.3f} s/image ({wall / tiny_wall:.0f}x faster than butd-r101)")
        tv = bench_tv(images)
        print(f"tv-frcnn-r50-fpn: {tv:.2f} s/image (butd-r101 / tv = {wall / tv:.2f})")
    if args.gpu and torch.cuda.is_available():
        rates, drift, cos, name = bench_gpu()
        print(f"\nGPU {name}: butd-r101 fp32 {rates['fp32']:.2f} images/s, bf16 autocast {rates['bf16']:.2f} "
              f"images/s; bf16 feature drift on the same boxes: max abs {drift:.4f}, min cosine {cos:.5f}")


if __name__ == "__main__":
    main()
