"""BUTD r101 (and VinVL X152-C4) at 600x1000 on CPU: s/image per precision, detector alone and the
extract-regions stage.

  conv rate   a res5-shaped 3x3 dilated conv, channels-last, per precision (extractors/precision.py)
  floor       the model's FLOPs for this input and 300 proposals (hooks on a meta-device copy: no
              compute) over that precision's conv rate; ratio = measured / floor
  detector    ButdDetector in a child process with every core: s/image over all N images (cold,
              as a stage task sees them), per sub-stage, and that process's peak RSS
  stage       extract-regions on 2 + N of the same images as PNG files and on 2 of them, in one run:
                defaults     no options (1 worker x every core)
                1 worker     --workers 1 --threads-per-worker 1 (the old default)
                2 workers    --workers 2 --shard-size N/2 (default threads: cores / 2 each)
              s/image = the difference of the two walls / N: what each further image costs, with
              the fixed costs (cluster start-up, worker imports, model build, index and manifest)
              cancelled; the whole run's (wall - build) / images and the fixed cost are printed too
  --gpu       images/s on CUDA in fp32 and bf16 (CANNOT be measured on a machine without CUDA)
  --merge     on (default), off or both: block 1's conv1 + shortcut as one conv (the default
              inference path) or as two; "both" runs off and on alternately, --repeats times, in
              one run, so their ratio is taken at the same load
  per part    the ROI head's and the backbone's own floors (their FLOPs over the same conv rate):
              which part is off its floor
  --models    butd-r101,vinvl-x152c4: the detector-alone rows for each (the stage rows: BUTD only).
              VinVL's floor uses the same dense conv rate, though most of its FLOPs are 32-group
              convs, which oneDNN runs below that rate: its ratio mixes both effects.

Random weights (calibrated, so activations are realistic in scale): speed does not depend on them.
Usage: python benchmarks/bench_detector.py [--images 4] [--precisions fp32,bf16] [--skip-stage] [--gpu]
       [--models butd-r101,vinvl-x152c4] [--merge on|off|both] [--malloc default|keep|both] [--repeats 1]
The first lines name the CPU model, its bf16 hardware (AMX / AVX512-BF16 / none, from
/proc/cpuinfo's flags) and the load average; bf16 on "none" is converted to fp32 arithmetic by
oneDNN, so its floor is that CPU's (slow) bf16 conv rate, measured like the others.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

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
    """FLOPs (2 x MACs) of convs and linears per sub-stage, on a meta-device model: what the
    detector runs (VinVL: no box deltas, IGNORE_BOX_REGRESSION; its attribute head on 100 boxes)."""
    from teranprep.extractors.butd.model import ButdModel
    from teranprep.extractors.vinvl.config import VinvlConfig
    from teranprep.extractors.vinvl.model import VinvlModel
    vinvl = isinstance(cfg, VinvlConfig)
    with torch.device("meta"):
        model = VinvlModel(cfg) if vinvl else ButdModel(cfg)
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
        if vinvl:
            model.roi_heads.box_predictor.attr_logits(feats[:100], torch.zeros(100, dtype=torch.long, device="meta"))
        else:
            model.roi_heads.box_predictor.bbox_pred(feats)
    return counts


def _detector_alone(precision, n, threads, device, queue, model="butd-r101", options=(), keep=False):
    from teranprep.extractors import build_detector
    from teranprep.extractors.base import DetectorSpec
    if keep:  # as a CPU `prep train` does (tried for extraction: not kept, benchmarks/README.md)
        from teranprep.pipeline.common.distribute import keep_freed_buffers
        keep_freed_buffers()
    torch.set_num_threads(threads)
    images = test_images(n)
    t = time.perf_counter()
    det = build_detector(DetectorSpec(model=model, random_seed=0, device=device, precision=precision,
                                      options=tuple(options)))
    build = time.perf_counter() - t
    if device != "cpu":
        det.detect(images[:1])  # CUDA: kernel selection and allocator warm-up are not the model
        det.timings = dict.fromkeys(det.timings, 0.0)
    t = time.perf_counter()
    det.detect(images)
    wall = time.perf_counter() - t
    queue.put({"build_s": build, "s_per_image": wall / n,
               "parts": {k: v / n for k, v in det.timings.items()},
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20})


def detector_alone(precision, n, threads, device="cpu", model="butd-r101", options=(), keep=False):
    """Runs in a fresh spawned process, so its peak RSS is the detector's own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_detector_alone, args=(precision, n, threads, device, queue, model, options, keep))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def stage(images_dir, out, precision, **options):
    from teranprep.pipeline.extract import extract_regions
    t = time.perf_counter()
    result = extract_regions(images_dir, out, model="butd-r101", random_weights=0, precision=precision,
                             quiet=True, overwrite=True, max_error_rate=0.0, **options)
    wall = time.perf_counter() - t
    manifest = json.loads((Path(out) / "manifest.json").read_text())
    shards = [json.loads(p.read_text()) for p in sorted((Path(out) / "shards").glob("regions-*.json"))]
    build = max(s["timings"]["build_s"] for s in shards)  # tasks build in parallel
    return {"wall": wall, "build": build, "n": result.n_ok,
            "threads": manifest["devices"]["threads_per_task"], "tasks": len(shards)}


def main():
    from teranprep.extractors.butd.config import get_config
    from teranprep.extractors.precision import conv_rate, cpu_description
    from teranprep.pipeline.common.distribute import machine_cores
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--skip-stage", action="store_true")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--models", default="butd-r101", help="comma-separated: butd-r101, vinvl-x152c4")
    p.add_argument("--merge", choices=("on", "off", "both"), default="on")
    p.add_argument("--repeats", type=int, default=1, help="detector-alone rows per setting (interleaved)")
    p.add_argument("--malloc", choices=("default", "keep", "both"), default="default",
                   help="default: glibc's own settings, as extract-regions runs (buffers over 32 MB "
                        "mapped afresh); keep: glibc keeps freed buffers for reuse, as a CPU `prep "
                        "train` sets it (keep_freed_buffers); both: alternately, like --merge both")
    args = p.parse_args()
    from teranprep.extractors.vinvl.config import get_config as vinvl_config
    models = args.models.split(",")
    cores = machine_cores()
    precisions = args.precisions.split(",")
    n = args.images
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {cores} cores, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"CPU: {cpu_description()}")
    part_flops = {m: count_flops(vinvl_config(m) if m.startswith("vinvl") else get_config(m)) for m in models}
    model_flops = {m: sum(f.values()) for m, f in part_flops.items()}
    flops = model_flops.get("butd-r101") or sum(count_flops(get_config("butd-r101")).values())
    if not args.skip_cpu:
        torch.set_num_threads(cores)
        rates = {pr: conv_rate(pr) for pr in precisions}
        print("conv rate (res5 3x3, channels-last, all cores): "
              + ", ".join(f"{pr} {r / 1e9:.0f} GFLOP/s" for pr, r in rates.items())
              + "; at 600x1000 + 300 proposals: "
              + ", ".join(f"{m} {f / 1e12:.2f} TFLOP/image" for m, f in model_flops.items()))
        alone = {}
        print(f"\n{'setting':48s}{'s/image':>9s}{'floor':>8s}{'ratio':>7s}  notes")
        merges = {"on": (True,), "off": (False,), "both": (False, True)}[args.merge]
        keeps = {"default": (False,), "keep": (True,), "both": (False, True)}[args.malloc]
        for m in models:
            for pr in precisions:
                floor = model_flops[m] / rates[pr]
                for _ in range(args.repeats):
                    for merge, keep in itertools.product(merges, keeps):
                        r = detector_alone(pr, n, cores, model=m, options=(("merge_shortcuts", merge),),
                                           keep=keep)
                        if m == "butd-r101":  # the stage rows compare with the last (merged when both)
                            alone[pr] = r
                        parts = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["parts"].items())
                        roi = r["parts"]["roi_head_s"] / (part_flops[m]["roi_head"] / rates[pr])
                        back = r["parts"]["backbone_s"] / (part_flops[m]["backbone"] / rates[pr])
                        name = (f"{m} {pr} alone" + ("" if args.merge == "on" else f" merge {'on' if merge else 'off'}")
                                + ("" if args.malloc == "default" else f" malloc {'keep' if keep else 'default'}"))
                        print(f"{name:48s}{r['s_per_image']:9.2f}{floor:8.2f}"
                              f"{r['s_per_image'] / floor:7.2f}  {parts}; ratio to own floor: ROI head "
                              f"{roi:.2f}, backbone {back:.2f}; peak RSS {r['peak_rss_gb']:.2f} GB; "
                              f"build {r['build_s']:.0f} s; load {os.getloadavg()[0]:.1f}", flush=True)
        if not args.skip_stage and "butd-r101" in models:
            from PIL import Image
            root = Path(tempfile.mkdtemp(prefix="bench-detector-"))
            try:
                small = 2  # the short run: its wall is the fixed cost (start-up, build, manifest) + 2 images
                for folder, count in (("images", small + n), ("images-small", small)):
                    (root / folder).mkdir()
                    for i, im in enumerate(test_images(count)):
                        Image.fromarray(im).save(root / folder / f"{i:03d}.png")  # lossless: same pixels
                settings = {"defaults": ({}, {}),
                            "1 worker x 1 thread": ({"workers": 1, "threads_per_worker": 1},) * 2,
                            "2 workers": ({"workers": 2, "shard_size": max(1, (small + n) // 2)},
                                          {"workers": 2, "shard_size": 1})}
                print(f"\nstage: s/image = (wall of {small + n} images - wall of {small}) / {n}, the cost of each "
                      "further image (start-up, model build and manifest cancel); whole = (wall - build) / images "
                      f"of the {small + n}-image run")
                for pr in precisions:
                    floor = flops / rates[pr]
                    for name, (options, small_options) in settings.items():
                        r = stage(root / "images", root / f"out-{pr}", pr, **options)
                        r0 = stage(root / "images-small", root / f"out-{pr}-small", pr, **small_options)
                        per = (r["wall"] - r0["wall"]) / n
                        whole = (r["wall"] - r["build"]) / r["n"]
                        fixed = r0["wall"] - small * per
                        print(f"{pr + ' stage ' + name:48s}{per:9.2f}{floor:8.2f}{per / floor:7.2f}  "
                              f"{r['tasks']} task(s) x {r['threads']} threads; stage / detector alone "
                              f"{per / alone[pr]['s_per_image']:.2f}; whole {whole:.2f} s/image; fixed cost "
                              f"{fixed:.0f} s (build {r['build']:.0f} s)", flush=True)
            finally:
                shutil.rmtree(root, ignore_errors=True)  # the stage's outputs
    if args.gpu:
        if not torch.cuda.is_available():
            print("\n--gpu: torch sees no CUDA device here, so GPU images/s cannot be measured on this machine")
            return
        print(f"\nGPU {torch.cuda.get_device_name()}:")
        for pr in precisions:
            r = detector_alone(pr, max(n, 8), 1, device="cuda")
            rate = conv_rate(pr, device="cuda")
            print(f"  butd-r101 {pr}: {1 / r['s_per_image']:.2f} images/s; FLOP floor ratio "
                  f"{r['s_per_image'] / (flops / rate):.2f}")


if __name__ == "__main__":
    main()
