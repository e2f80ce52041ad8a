"""BUTD through the CLI and the pipeline: weights registry, given boxes, show-regions, full size."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import write_images
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.extractors import DetectorSpec, build_detector, resolve_model
from teranprep.extractors import registry
from teranprep.manifests import FeatureStore
from teranprep.pipeline.extract import extract_regions
from teranprep.pipeline.common.images import read_image
from teranprep.pipeline.regions import read_given_boxes
from teranprep.threads import torch_threads


def run(*args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result, result.output + (getattr(result, "stderr", "") or "")


def test_weights_list_and_path_use_the_cache_dir(tmp_path):
    env = {"TERANPREP_CACHE": str(tmp_path / "cache")}
    result, out = run("weights", "list", env=env)
    assert result.exit_code == 0
    for name in ("butd-vg-r101-k36", "butd-vg-r101-k10-100", "butd-vg-r101-caffe-attr"):
        assert name in out
    assert "boxes 36..36" in out and "boxes 10..100" in out
    result, out = run("weights", "path", "butd-vg-r101-k36", env=env)
    assert out.strip() == str(tmp_path / "cache" / registry.WEIGHTS["butd-vg-r101-k36"].filename)


def test_absent_named_weights_error_names_the_url_and_the_path(tmp_path):
    images = tmp_path / "images"
    write_images(images, 1)
    env = {"TERANPREP_CACHE": str(tmp_path / "cache")}
    result, out = run("extract-regions", images, tmp_path / "out", "--model", "butd-vg-r101-k36", env=env)
    assert result.exit_code == 2
    entry = registry.WEIGHTS["butd-vg-r101-k36"]
    assert entry.url in out and str(tmp_path / "cache" / entry.filename) in out


def test_named_weights_bring_their_box_policy_and_a_wrong_sha256_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TERANPREP_CACHE", str(tmp_path))
    entry = registry.WEIGHTS["butd-vg-r101-k36"]
    (tmp_path / entry.filename).write_bytes(b"not the published file")
    model, weights, lo, hi = resolve_model("butd-vg-r101-k36", None, None)
    assert (model, weights, lo, hi) == ("butd-r101", str(tmp_path / entry.filename), 36, 36)
    assert resolve_model("butd-vg-r101-k36", None, None, 5, None)[2:] == (5, 36)
    assert resolve_model("butd-tiny", None, 0) == ("butd-tiny", None, 10, 100)
    with pytest.raises(PrepError, match="random-weights"):
        resolve_model("butd-vg-r101-k36", None, 0)
    from dataclasses import replace
    monkeypatch.setitem(registry.WEIGHTS, entry.name, replace(entry, sha256="0" * 64))
    with pytest.raises(PrepError, match="differs from the published"):
        resolve_model("butd-vg-r101-k36", None, None)


@pytest.fixture(scope="module")
def given_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("given")
    images = tmp / "images"
    keys = write_images(images, 2, size=(60, 80))
    boxes = {keys[0]: [[0, 0, 79, 59], [10, 5, 40, 30.5]], keys[1]: [[20, 20, 70, 50]]}
    path = tmp / "boxes.json"
    path.write_text(json.dumps(boxes))
    result, out = run("extract-regions", images, tmp / "out", "--model", "butd-tiny", "--random-weights", 0,
                      "--given-boxes", path, "--workers", 0, "--dtype", "float32", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, out
    return images, tmp / "out", keys, boxes


@pytest.mark.threads
def test_given_boxes_extract_exactly_those_boxes_with_the_models_features(given_run):
    images, out, keys, boxes = given_run
    # Bit-equal by construction only at the shard task's thread count (the manifest records it):
    # the detector's calibration and its convolutions round differently at other counts.
    threads = json.loads((out / "manifest.json").read_text())["devices"]["threads_per_task"]
    assert len(threads) == 1  # one setting for every shard of the run
    with torch_threads(threads[0]):
        detector = build_detector(DetectorSpec(model="butd-tiny", random_seed=0))
        with FeatureStore(out) as store:
            for key in keys:
                regions = store[key]
                np.testing.assert_array_equal(regions.boxes, np.asarray(boxes[key], np.float32))
                image, _ = read_image(images / key)
                direct = detector.detect([image], [np.asarray(boxes[key], np.float32)])[0]
                np.testing.assert_array_equal(regions.features, direct.features)
                assert regions.attr_ids is not None


def test_given_boxes_parquet_reads_like_json(tmp_path):
    frame = pd.DataFrame({"image_key": ["a.jpg", "b/c.png"],
                          "boxes": [[[0, 0, 5, 5], [1, 2, 3, 4]], [[2, 2, 9, 9]]]})
    frame.to_parquet(tmp_path / "b.parquet")
    (tmp_path / "b.json").write_text(json.dumps(dict(zip(frame.image_key, frame.boxes))))
    a, b = read_given_boxes(tmp_path / "b.parquet"), read_given_boxes(tmp_path / "b.json")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    (tmp_path / "bad.json").write_text(json.dumps({"a.jpg": [[5, 5, 1, 1]]}))
    with pytest.raises(PrepError, match="invalid boxes"):
        read_given_boxes(tmp_path / "bad.json")


def test_show_regions_draws_the_boxes_with_labels(given_run, tmp_path):
    images, out, keys, boxes = given_run
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing{i}" for i in range(200)))
    result, text = run("show-regions", out, keys[1], "-o", tmp_path / "png", "--labels", labels)
    assert result.exit_code == 0, text
    png = np.asarray(Image.open(tmp_path / "png" / (keys[1].replace("/", "__") + ".png")).convert("RGB"))
    original, _ = read_image(images / keys[1])
    assert png.shape == original.shape
    changed = np.any(png != original, axis=2)
    assert changed[35, 20] and changed[20, 45]  # on the outline of box [20, 20, 70, 50] (left, top)
    assert not changed[57, 2]  # far from the box and its label
    result, text = run("show-regions", out, "missing.jpg", "-o", tmp_path / "png")
    assert result.exit_code == 2 and "missing.jpg" in text


@pytest.mark.fullsize
@pytest.mark.threads
def test_full_size_butd_with_random_weights_extracts_end_to_end_in_float16(tmp_path):
    images = tmp_path / "images"
    write_images(images, 2, size=(48, 64))
    spec = DetectorSpec(model="butd-r101", random_seed=0, device="cpu", conf_thresh=0.2, min_boxes=10,
                        max_boxes=100)
    with torch_threads(1):  # the shard task's count: the pipeline reuses this instance (cache key)
        detector = build_detector(spec)
    peak = []
    hooks = [m.register_forward_hook(lambda m, a, o: peak.append(float(o.abs().max())))
             for m in detector.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        result = extract_regions(images, tmp_path / "out", model="butd-r101", random_weights=0, device="cpu",
                                 workers=0, threads_per_worker=1, dtype="float16", quiet=True)
    finally:
        for h in hooks:
            h.remove()
    assert result.n_ok == 2 and result.n_error == 0
    assert peak and max(peak) < 65504 and np.isfinite(peak).all()
    with FeatureStore(tmp_path / "out") as store:
        for regions in store:
            assert regions.features.shape[1] == 2048 and 10 <= len(regions) <= 100
            assert np.isfinite(regions.features).all()
    assert store.manifest["input"]["root"] == str(images.resolve())
