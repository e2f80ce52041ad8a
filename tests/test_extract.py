"""extract-regions end to end on real images, a real (random-weight) detector and real HDF5 files."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import write_images
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.manifests import FeatureStore
from teranprep.pipeline.extract import extract_regions
from teranprep.pipeline.verify import verify

FAST = dict(model="tv-frcnn-mbv3-320", random_weights=0, batch_size=2, quiet=True)


def all_arrays(features_dir):
    """Every stored array of every ok image, by key, read back through the reader."""
    with FeatureStore(features_dir) as store:
        return {k: (r.boxes.copy(), r.features.copy(), r.class_ids.copy()) for k, r in
                ((k, store[k]) for k in store.keys())}


def assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert x.tobytes() == y.tobytes(), key


def snapshot(directory):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_bad_inputs_are_recorded_and_the_run_goes_on(image_dir, tmp_path):
    good = write_images(image_dir, 4)
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "text.png").write_text("not an image")
    full = (image_dir / good[0]).read_bytes()
    (image_dir / "truncated.jpg").write_bytes(full[: len(full) // 3] if good[0].endswith("jpg")
                                              else (image_dir / good[1]).read_bytes()[:300])
    (image_dir / "dangling.jpg").symlink_to(image_dir / "nowhere.jpg")
    out = tmp_path / "features"
    with pytest.raises(PrepError, match="images failed"):
        extract_regions(image_dir, out, workers=0, **FAST)  # 4 of 8 bad > 1%
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert set(index.index) == set(good) | {"empty.jpg", "text.png", "truncated.jpg", "dangling.jpg"}
    assert (index.loc[good, "status"] == "ok").all()
    errors = index.loc[["empty.jpg", "text.png", "truncated.jpg", "dangling.jpg"]]
    assert (errors["status"] == "error").all() and (errors["row"] == -1).all()
    assert "empty" in errors.loc["empty.jpg", "error"]
    assert "unreadable" in errors.loc["dangling.jpg", "error"]
    # Completed work is intact and consistent, but the folder is a failed run's: verify says so.
    problems = verify(out).problems
    assert len(problems) == 1 and "extract-regions run that wrote it failed" in problems[0], problems
    result = extract_regions(image_dir, out, workers=0, max_error_rate=0.6, **FAST)
    assert (result.n_ok, result.n_error, result.shards_run) == (4, 4, 0)
    assert verify(out).ok  # the passing re-run cleared the mark


@pytest.mark.threads
def test_regions_match_a_direct_detector_call(image_dir, tmp_path):
    from teranprep.extractors import DetectorSpec, build_detector
    from teranprep.pipeline.common.images import read_image
    keys = write_images(image_dir, 3)
    extract_regions(image_dir, tmp_path / "f", workers=0, dtype="float32", batch_size=1,
                    threads_per_worker=1, **{k: v for k, v in FAST.items() if k != "batch_size"})
    from teranprep.threads import torch_threads
    stored = all_arrays(tmp_path / "f")
    with torch_threads(1):  # what a shard task uses (calibration included): the same bits
        detector = build_detector(DetectorSpec(model="tv-frcnn-mbv3-320", random_seed=0))
        for key in keys:
            image, _ = read_image(image_dir / key)
            det = detector.detect([image])[0]
            np.testing.assert_array_equal(stored[key][0], det.boxes)
            np.testing.assert_array_equal(stored[key][1], det.features)
            assert stored[key][1].shape[0] >= 10  # --min-boxes default
            assert (det.boxes[:, 2] <= image.shape[1] + 1e-3).all() and (det.boxes[:, 3] <= image.shape[0] + 1e-3).all()


def test_rerun_of_complete_stage_changes_no_file(image_dir, tmp_path):
    write_images(image_dir, 5)
    out = tmp_path / "f"
    extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    before = snapshot(out)
    time.sleep(0.01)
    result = extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    assert result.shards_run == 0
    assert snapshot(out) == before


def test_changed_parameters_are_refused_unless_overwrite(image_dir, tmp_path):
    write_images(image_dir, 3)
    out = tmp_path / "f"
    extract_regions(image_dir, out, workers=0, **FAST)
    before = snapshot(out)
    with pytest.raises(PrepError, match="other parameters"):
        extract_regions(image_dir, out, workers=0, conf_thresh=0.5, **FAST)
    assert snapshot(out) == before
    result = extract_regions(image_dir, out, workers=0, conf_thresh=0.5, overwrite=True, **FAST)
    assert result.shards_run == 1
    assert json.loads((out / "manifest.json").read_text())["parameters"]["conf_thresh"] == 0.5


def test_changed_input_file_reruns_only_its_shard(image_dir, tmp_path):
    keys = write_images(image_dir, 6)
    out = tmp_path / "f"
    extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    write_images(tmp_path / "other", 1, seed=9, formats=(keys[5].rsplit(".", 1)[1],))
    (image_dir / keys[5]).write_bytes((tmp_path / "other" / "img000.png").read_bytes()
                                      if keys[5].endswith("png") else
                                      (tmp_path / "other" / "img000.jpg").read_bytes())
    result = extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    assert result.shards_run == 1
    assert verify(out).ok


def test_dry_run_prints_the_plan_and_writes_nothing(image_dir, tmp_path):
    write_images(image_dir, 5)
    lines = []
    extract_regions(image_dir, tmp_path / "f", shard_size=2, dry_run=True, echo=lines.append, **FAST)
    assert "5 images -> 3 shards" in lines[0]
    assert sum("[new images]" in line for line in lines) == 3
    assert not (tmp_path / "f").exists()


def test_limit_and_shard_layout(image_dir, tmp_path):
    keys = write_images(image_dir, 5)
    out = tmp_path / "f"
    extract_regions(image_dir, out, workers=0, shard_size=2, limit=3, **FAST)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["n_images"] for s in manifest["shards"]] == [2, 1]
    with h5py.File(out / manifest["shards"][0]["path"]) as h5:
        assert [k.decode() for k in h5["image_keys"][:]] == keys[:2]
        assert h5["offsets"][-1] == h5["features"].shape[0] == manifest["shards"][0]["n_boxes"]
        assert h5["features"].dtype == np.float16
    assert FeatureStore(out).keys() == keys[:3]


class _HugeDetector:
    """A detector whose features exceed float16's range for one image (a bright one)."""
    name, feature_dim, weights_sha256, columns = "huge", 4, "none", ()

    def detect(self, images, boxes=None):
        from teranprep.extractors import Detections
        return [Detections(np.array([[0, 0, 2, 2]], np.float32),
                           np.full((1, 4), 1e6 if im.mean() > 200 else 1.0, np.float32)) for im in images]


def test_float16_overflow_is_an_error_naming_the_image(image_dir, tmp_path, monkeypatch):
    from PIL import Image
    from teranprep import extractors
    monkeypatch.setitem(extractors.MODELS, "huge", lambda spec: _HugeDetector())
    write_images(image_dir, 2)
    Image.new("RGB", (8, 8), (255, 255, 255)).save(image_dir / "white.png")
    out = tmp_path / "f"
    with pytest.raises(PrepError):
        extract_regions(image_dir, out, model="huge", random_weights=0, workers=0, quiet=True)
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["white.png", "status"] == "error"
    assert "white.png" in index.loc["white.png", "error"] and "float16" in index.loc["white.png", "error"]
    assert (index.drop("white.png")["status"] == "ok").all()


def test_random_weight_full_model_stays_in_float16_range(image_dir, tmp_path):
    write_images(image_dir, 1, size=(64, 80))
    result = extract_regions(image_dir, tmp_path / "f", model="tv-frcnn-r50-fpn", random_weights=3,
                             workers=0, quiet=True)
    assert result.n_ok == 1
    features = next(iter(FeatureStore(tmp_path / "f"))).features
    assert np.isfinite(features).all() and 0 < np.abs(features).max() < 65504


@pytest.mark.threads
def test_one_and_two_dask_workers_give_identical_arrays(image_dir, tmp_path):
    write_images(image_dir, 6)  # the same thread setting; the default would give 2, 1 and 2 here
    same = dict(shard_size=2, threads_per_worker=1, **FAST)
    extract_regions(image_dir, tmp_path / "w1", workers=1, **same)
    extract_regions(image_dir, tmp_path / "w2", workers=2, **same)
    extract_regions(image_dir, tmp_path / "w0", workers=0, **same)
    a = all_arrays(tmp_path / "w1")
    assert_same_arrays(a, all_arrays(tmp_path / "w2"))
    assert_same_arrays(a, all_arrays(tmp_path / "w0"))


@pytest.mark.threads
def test_scheduler_address_of_a_local_cluster(image_dir, tmp_path):
    from dask.distributed import LocalCluster
    write_images(image_dir, 4)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        result = extract_regions(image_dir, tmp_path / "s", scheduler=cluster.scheduler_address,
                                 shard_size=2, **FAST)
    assert result.n_ok == 4 and verify(tmp_path / "s").ok
    # a remote scheduler's default is 1 thread per task; the same setting here gives the same bits
    extract_regions(image_dir, tmp_path / "local", workers=0, shard_size=2, threads_per_worker=1, **FAST)
    assert_same_arrays(all_arrays(tmp_path / "s"), all_arrays(tmp_path / "local"))


def test_unreachable_scheduler_is_one_clear_error(image_dir, tmp_path):
    write_images(image_dir, 1)
    runner = CliRunner()
    res = runner.invoke(main, ["extract-regions", str(image_dir), str(tmp_path / "f"), "--model",
                               "tv-frcnn-mbv3-320", "--random-weights", "0", "--quiet",
                               "--scheduler", "tcp://127.0.0.1:9"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error:") and "scheduler" in res.output
    assert len([line for line in res.output.strip().splitlines() if not line.startswith("WARNING:")]) == 1


def _cli(image_dir, out, *extra):
    return [sys.executable, "-m", "teranprep", "extract-regions", str(image_dir), str(out),
            "--model", "tv-frcnn-mbv3-320", "--random-weights", "0", "--shard-size", "2",
            "--batch-size", "1", "--quiet", *extra]


@pytest.mark.threads
@pytest.mark.parametrize("workers", ["0", "1"])
def test_resume_after_kill_gives_identical_features(image_dir, tmp_path, workers):
    write_images(image_dir, 9)
    reference = tmp_path / "reference"
    extract_regions(image_dir, reference, workers=0, shard_size=2, batch_size=1,
                    **{k: v for k, v in FAST.items() if k != "batch_size"})
    out = tmp_path / "killed"
    rng = random.Random(int(workers) + 7)
    for attempt in range(2):
        markers = len(list(out.glob("shards/*.json")))
        proc = subprocess.Popen(_cli(image_dir, out, "--workers", workers), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if attempt == 0:
            time.sleep(rng.uniform(0.5, 4.0))  # anywhere from start-up to the first shards
        else:  # once this run has completed a shard, at a random point inside the next ones
            deadline = time.time() + 120
            while len(list(out.glob("shards/*.json"))) <= markers and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its dask workers alike
        proc.wait()
    done = subprocess.run(_cli(image_dir, out, "--workers", workers), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = verify(out)
    assert report.ok, report.problems
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert_same_arrays(all_arrays(out), all_arrays(reference))
