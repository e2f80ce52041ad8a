"""The shortened demo end to end: every stage runs offline, the trained models reach the quick
demo's bar (check_demo_targets), and the detector's mAP is what an independent AP computation
of its own detections gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detection_helpers import voc_ap_by_hand
from teranprep.pipeline.demo import DemoResult, DemoSettings, check_demo_targets

SRC = Path(__file__).resolve().parents[1] / "src"


def _result(t2i_r1, i2t_r1, detector_map):
    metrics = {"t2i": {"r1": t2i_r1}, "i2t": {"r1": i2t_r1}}
    return DemoResult(Path("x"), {}, metrics, detector_map, [], 0.0)


def test_demo_bar_names_each_missed_target_and_passes_at_the_bar():
    """The bar (DemoSettings.min_r1 / min_map, the quick demo's: benchmarks/README.md "The quick
    demo's bar") is >=: a value at the bar passes, one just below names its target."""
    quick = DemoSettings.quick()
    assert (quick.min_r1, quick.min_map) == (20.0, 0.15)
    assert check_demo_targets(_result(20.0, 20.0, 0.15), 20.0, 0.15) == []
    assert check_demo_targets(_result(19.9, 20.0, 0.15), 20.0, 0.15) == ["text->image R@1 19.9 < 20.0"]
    assert check_demo_targets(_result(20.0, 5.0, 0.15), 20.0, 0.15) == ["image->text R@1 5.0 < 20.0"]
    assert check_demo_targets(_result(90.0, 90.0, 0.1499), 20.0, 0.15) == ["detector mAP@0.5 0.1499 < 0.15"]
    assert check_demo_targets(_result(90.0, 90.0, None), 20.0, 0.15) == ["detector mAP@0.5 None < 0.15"]
    assert len(check_demo_targets(_result(0.0, 0.0, 0.0), 20.0, 0.15)) == 3
    full = DemoSettings()
    assert full.bar() == f"R@1 >= {full.min_r1:g} text->image and image->text, detector mAP@0.5 >= {full.min_map:g}"


@pytest.mark.fullsize
@pytest.mark.threads
@pytest.mark.xdist_group("quick_demo")  # one worker builds the session's quick demo
def test_quick_demo_runs_every_stage_and_reaches_its_bar(quick_demo, tmp_path):
    result, lines, settings = quick_demo
    m = result.metrics
    n = m["n_images"]
    assert n == settings.test or n == settings.test + 1  # a twin pair may add one
    assert check_demo_targets(result, settings.min_r1, settings.min_map) == [], m
    assert lines[0] == f"demo bar (checked at the end): {settings.bar()}"
    # the full bar is the full demo's: the quick one is not expected to reach it, and the check
    # must say so (names both directions and the detector)
    full = check_demo_targets(result, min_r1=101.0, min_map=1.01)
    assert [p.split(" R@1")[0] for p in full[:2]] == ["text->image", "image->text"]
    assert full[2].startswith("detector mAP@0.5")
    for direction in ("t2i", "i2t"):
        assert m[direction]["medr"] < n / 4, m

    # pictures: one show-regions and one show-alignment PNG per picture, each announced
    assert len(result.pictures) == 2 * settings.pictures
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.pictures)
    aligned = [line for line in lines if "word pieces aligned" in line]
    assert len(aligned) == settings.pictures and all(str(p) in " ".join(aligned)
                                                     for p in result.pictures if "alignment" in str(p))
    # the demo ends with an index of its test images and one search (top 5) + the serve command
    index = result.stages["index"]
    assert len(index["top5"]) == 5 and index["query"]
    assert any(line.startswith("serve it: prep serve ") for line in lines)
    assert set(index["shortlist_recall"]["trained"]) == {"10", "20", "50", "100", "500", "1000"}
    demo = result.out
    summary = json.loads((demo / "demo-summary.json").read_text())
    assert summary["metrics"]["rsum"] == pytest.approx(m["rsum"])
    assert summary["metrics"]["rsum"] == pytest.approx(sum(m[d][f"r{k}"] for d in ("i2t", "t2i")
                                                           for k in (1, 5, 10)))

    _check_detector_map_independently(demo, result.detector_map)

    # bf16 eval of the same checkpoint stays within the documented drift (docs/ARCHITECTURE.md):
    # scores correlate > 0.999 with fp32, and a recall moves by one query's hit or 2.5 points at most.
    from teranprep.pipeline.evaluate import evaluate
    bf16 = evaluate(demo / "runs" / "demo", demo / "splits", split="test", device="cpu",
                    precision="bf16", echo=lambda _: None)
    drift = bf16["drift_vs_fp32"]
    assert drift["fp32_recall"]["t2i"]["r1"] == pytest.approx(m["t2i"]["r1"])
    assert drift["score_correlation"] > 0.999, drift
    # A recall moves only where a query's ground truth sat in a near-tie at rank k, and which
    # near-ties flip depends on the CPU's rounding (at OMP_NUM_THREADS=2 here two of 120 caption
    # queries did at R@1, at 1 thread none): the bound is one query's hit or 2.5 points,
    # whichever is larger. A broken bf16 path moves recalls by tens of points.
    n_queries = {"i2t": bf16["n_images"], "t2i": bf16["n_captions"]}
    for d, diffs in drift["recall_difference"].items():
        assert all(abs(v) <= max(100.0 / n_queries[d], 2.5) + 1e-9 for v in diffs.values()), drift
    assert max(drift["max_rank_change"].values()) <= max(3, n // 8), drift

    # every stage is resumable: `prep demo` again (a real subprocess) redoes nothing, ends with
    # the same metrics, and exits 0 at its own bar; below the bar it prints it exits 1 with one
    # line naming the missed target
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "teranprep", "demo", "--quick", "--out", str(demo)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert time.perf_counter() - t0 < result.wall_s / 2
    assert done.returncode == 0, done.stderr
    assert f"demo bar met: {settings.bar()}" in done.stdout
    again = json.loads((demo / "demo-summary.json").read_text())
    assert all(again["stages"][s]["noop"] for s in
               ("make-synthetic", "train-detector", "extract-regions", "build-splits", "train", "index"))
    assert again["metrics"] == json.loads(json.dumps(m, default=str))
    done = subprocess.run(cmd + ["--min-r1", "101"], capture_output=True, text=True, env=env,
                          timeout=1200)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert "text->image R@1" in errors[0] and "image->text R@1" in errors[0] and "< 101.0" in errors[0]
    assert "Traceback" not in done.stderr


def _check_detector_map_independently(demo, recorded_map):
    """The detector's recorded val mAP@0.5 equals VOC AP computed by tests/detection_helpers.py
    from the detections its final checkpoint makes on the validation images (same process and
    thread count as its training, so the same boxes), with real true positives."""
    import torch
    import yaml

    from teranprep.extractors.butd.config import get_config
    from teranprep.extractors.butd.model import ButdModel
    from teranprep.pipeline.common.images import read_image
    from teranprep.extractors.butd.training.engine import detect_objects, load_coco
    ckpt = torch.load(demo / "detector" / "model_final.pth", weights_only=True)
    model = ButdModel(get_config(ckpt["architecture"], **{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in ckpt["config"].items()}))
    model.load_state_dict(ckpt["model"])
    model.eval()
    e = yaml.safe_load((demo / "detector" / "config.yaml").read_text())["eval"]
    coco = load_coco(demo / "synthetic" / "instances.json")
    val = [s for s in coco.samples if s.split == "val"][:e.get("max_images") or None]
    with torch.no_grad():
        detections = [detect_objects(model, read_image(demo / "synthetic" / "images" / s.key)[0],
                                     e["score_thresh"], e["nms"], e["max_per_image"]) for s in val]
    truths = [{"boxes": s.boxes, "labels": s.labels} for s in val]
    aps, hits = [], 0
    for label in range(1, len(coco.classes) + 1):
        ap, tp = voc_ap_by_hand(detections, truths, label)
        if ap is not None:
            aps.append(ap)
            hits += tp
    assert hits >= 10  # many boxes found with the right class: the comparison is not 0 == 0
    assert recorded_map == pytest.approx(round(sum(aps) / len(aps), 4), abs=1e-12)
