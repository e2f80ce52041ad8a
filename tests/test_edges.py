"""Issue 10: every wrong input, path and signal, driven through the real `prep` in a subprocess.

Each test asserts the exit code, the one-line message (never a traceback), that every output that
existed before is byte-identical afterwards, and that a re-run or resume then completes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import write_images

TV = ["--model", "tv-frcnn-mbv3-320", "--random-weights", "0", "--quiet"]


class Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def prep(*args, timeout=300, env=None):
    """The real `prep` command line in a subprocess (this interpreter, `-m teranprep`): its exit
    code, stdout and stderr as a user's shell would see them."""
    done = subprocess.run([sys.executable, "-m", "teranprep", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return Ran(done.returncode, done.stdout, done.stderr)


def tree(directory: Path) -> dict:
    """relative path -> (bytes, mtime_ns) of every file under `directory`."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_one_error(proc, *needles, code=2):
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    others = [line for line in proc.stderr.splitlines()
              if line.strip() and not line.startswith(("error:", "WARNING:"))]
    assert not others, out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def features(tmp_path):
    images = tmp_path / "images"
    write_images(images, 4)
    out = tmp_path / "features"
    done = prep("extract-regions", images, out, *TV, "--shard-size", "2", "--workers", "0")
    assert done.returncode == 0, done.stderr
    return images, out


def karpathy(path: Path, keys):
    path.write_text(json.dumps({"images": [
        {"filename": k, "split": ["train", "val", "test"][i % 3],
         "sentences": [{"raw": f"a picture number {i}"}, {"raw": f"another view {i}"}]}
        for i, k in enumerate(keys)]}))
    return path


# ------------------------------------------------------------ 2. one stage per output folder

def test_build_splits_into_a_features_folder_is_refused_and_touches_nothing(features, tmp_path):
    images, feats = features
    keys = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.*"))
    captions = karpathy(tmp_path / "caps.json", keys)
    before = tree(feats)
    proc = prep("build-splits", captions, "--features", feats, "--out", feats,
                "--image-key-template", "{filename}", "--max-missing", "100")
    assert_one_error(proc, str(feats), "region features", "another output folder")
    assert tree(feats) == before
    inside = prep("build-splits", captions, "--features", feats, "--out", feats / "splits",
                  "--image-key-template", "{filename}", "--max-missing", "100")
    assert_one_error(inside, "lies inside")
    assert tree(feats) == before
    ok = prep("build-splits", captions, "--features", feats, "--out", tmp_path / "splits",
              "--image-key-template", "{filename}", "--max-missing", "100")
    assert ok.returncode == 0, ok.stderr


def test_extract_into_a_splits_folder_and_eval_into_features_are_refused(features, tmp_path):
    images, feats = features
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "manifest.json").write_text(json.dumps({"format": "teranprep.splits"}))
    before = tree(splits)
    proc = prep("extract-regions", images, splits, *TV)
    assert_one_error(proc, "caption splits")
    assert tree(splits) == before
    # eval checks its output before loading anything: the run need not even exist yet
    t0 = time.perf_counter()
    before_f = tree(feats)
    proc = prep("eval", tmp_path / "no-run", "--splits", splits, "--out", feats / "eval")
    assert_one_error(proc, "lies inside", str(feats))
    assert tree(feats) == before_f
    assert time.perf_counter() - t0 < 60


def test_output_path_that_is_a_file_is_one_line(features, tmp_path):
    images, _ = features
    target = tmp_path / "a-file"
    target.write_text("x")
    for args in (["extract-regions", images, target, *TV],
                 ["import-features", "butd-tsv", tmp_path / "none.tsv", target],
                 ["make-synthetic", target, "--images", "3"]):
        assert_one_error(prep(*args), str(target), "is a file")
        assert target.read_text() == "x"
    below = prep("extract-regions", images, target / "sub", *TV)
    assert_one_error(below, "is a file")


@pytest.fixture
def read_only_dir(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot make a read-only mount here (needs root and mount)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_read_only_output_is_one_line(features, read_only_dir, tmp_path):
    images, _ = features
    proc = prep("extract-regions", images, read_only_dir / "features", *TV)
    assert_one_error(proc, str(read_only_dir / "features"), "cannot write here")
    proc = prep("make-synthetic", read_only_dir / "syn", "--images", "3")
    assert_one_error(proc, "cannot write here")


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "full"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot make a small tmpfs here (needs root and mount)")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_not_retried(tmp_path, tiny_disk):
    images = tmp_path / "images"
    write_images(images, 6, size=(200, 260))
    proc = prep("extract-regions", images, tiny_disk / "features", *TV, "--dtype", "float32",
                "--workers", "1", "--shard-size", "3")
    line = assert_one_error(proc, "space")
    assert "attempt" not in line  # failed at once, not after every retry
    free = prep("extract-regions", images, tmp_path / "features", *TV, "--dtype", "float32",
                "--workers", "0", "--shard-size", "3")
    assert free.returncode == 0, free.stderr


# ------------------------------------------------------------ 3. wrong files: one line each

def test_wrong_files_as_weights_checkpoints_and_configs_are_one_line(features, tmp_path):
    import torch
    images, feats = features
    text = tmp_path / "notes.txt"
    text.write_text("hello world\nthis is not a checkpoint\n")
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    real = tmp_path / "tv.pth"
    from teranprep.extractors import DetectorSpec, build_detector
    torch.save(build_detector(DetectorSpec(model="tv-frcnn-mbv3-320", random_seed=0)).model.state_dict(), real)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    out = tmp_path / "f2"
    # through a dask worker: a deterministic error is not retried, and arrives as its one line
    t0 = time.perf_counter()
    proc = prep("extract-regions", images, out, "--model", "butd-tiny", "--weights", text,
                "--workers", "1", "--quiet")
    line = assert_one_error(proc, str(text), "text file", "not a detector checkpoint")
    assert "attempt" not in line
    for weights, needle in ((listing, "expected a (non-empty) dict"), (truncated, "not a detector checkpoint"),
                            (real, "checkpoint has no")):  # a torchvision model given to BUTD
        assert_one_error(prep("extract-regions", images, out, "--model", "butd-tiny", "--weights",
                              weights, "--workers", "0", "--quiet"), str(weights), needle)
    assert_one_error(prep("extract-regions", images, out, "--model", "tv-frcnn-r50-fpn", "--weights",
                          real, "--workers", "0", "--quiet"), "not a tv-frcnn-r50-fpn checkpoint")
    splits = tmp_path / "splits"
    splits.mkdir()
    assert_one_error(prep("eval", text, "--splits", splits, "--out", tmp_path / "e"), "text file")
    assert_one_error(prep("eval", tmp_path, "--splits", splits, "--out", tmp_path / "e2"), "no checkpoint")
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 8)
    assert_one_error(prep("train", splits, "--config", binary, "--out", tmp_path / "run"), "not a YAML config")
    assert_one_error(prep("train-detector", text, images, "--config", binary, "--out", tmp_path / "det"),
                     "detector config")


# ------------------------------------------------------------ 4. interrupts keep work, say so

def _wait_for(predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "0")])
def test_interrupted_extract_keeps_shards_says_so_and_resumes(tmp_path, sig, workers):
    images = tmp_path / "images"
    write_images(images, 6)
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "teranprep", "extract-regions", str(images), str(out), *TV,
           "--shard-size", "2", "--batch-size", "1", "--workers", workers]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert _wait_for(lambda: len(list(out.glob("shards/regions-*.json"))) >= 1), "no shard completed"
    os.killpg(proc.pid, sig)  # the whole group, as a terminal's Ctrl-C does
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stdout + stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"interrupted ({signal.Signals(sig).name})"), lines[0]
    assert " of 3 shards complete" in lines[0] and "resume with: prep extract-regions" in lines[0]
    kept = {p.name: p.read_bytes() for p in out.glob("shards/regions-*.h5")}
    assert kept
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name, data in kept.items():  # completed shards are kept as they were, not redone
        assert (out / "shards" / name).read_bytes() == data
    reference = prep("extract-regions", images, tmp_path / "reference", *TV, "--shard-size", "2",
                     "--batch-size", "1", "--workers", "0")
    assert reference.returncode == 0
    from teranprep.manifests.features import FeatureStore
    with FeatureStore(out) as a, FeatureStore(tmp_path / "reference") as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            np.testing.assert_array_equal(a[key].features, b[key].features)


def test_interrupted_training_writes_a_checkpoint_and_resume_continues(tmp_path, make_features):
    from teran_fixtures import make_tiny_bert, random_dataset, tiny_config
    splits, _ = random_dataset(tmp_path, make_features)
    bert = make_tiny_bert(tmp_path / "bert")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(bert, epochs=400, val_every=100000,
                                                 checkpoint_every=0)))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "teranprep", "train", str(splits), "--config", str(config), "--out", str(run)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)

    def steps_logged():
        path = run / "metrics.jsonl"
        return path.is_file() and path.read_text().count('"train"') >= 3

    assert _wait_for(steps_logged), "training never started"
    assert not (run / "checkpoint_last.pt").exists()  # before any validation or periodic checkpoint
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stdout + stderr
    line = [x for x in stderr.splitlines() if x.strip() and not x.startswith("WARNING:")]
    assert len(line) == 1, stderr
    assert "resumable checkpoint at step" in line[0] and "resume with: prep train" in line[0]
    from teranprep.pipeline.train import load_checkpoint
    step = int(load_checkpoint(run / "checkpoint_last.pt")["step"])
    assert step >= 3
    resumed = prep("train", splits, "--out", run, "--resume", "--stop-after", step + 2, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert int(load_checkpoint(run / "checkpoint_last.pt")["step"]) == step + 2


def _interrupt(cmd, ready, sig=signal.SIGINT, env=None, timeout=240) -> str:
    """Starts `cmd` in its own process group, sends `sig` to the group once `ready()` holds (as a
    terminal's Ctrl-C does), and checks the stage's answer: exit 128 + sig, no traceback, one
    line saying what was kept and how to resume. Returns that line."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    reached = _wait_for(lambda: proc.poll() is not None or ready(), timeout)
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert reached and proc.returncode == 128 + sig, (proc.returncode, stderr[-2000:])
    assert "Traceback" not in stdout + stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("WARNING:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"interrupted ({signal.Signals(sig).name})") and "resume with: prep" in lines[0]
    return lines[0]


def test_a_signal_landing_in_a_weakref_callback_prints_no_traceback_and_still_interrupts(tmp_path):
    """A real SIGINT whose handler runs inside a weakref callback (where Python prints "Exception
    ignored ... Traceback" and drops the exception; seen once when a Ctrl-C met garbage collection
    in import-features): nothing is printed, and check_interrupted(), which the stages call
    between items, raises it after the callback."""
    script = tmp_path / "callback.py"
    script.write_text(textwrap.dedent("""
        import os, signal, weakref
        from teranprep.interrupts import Interrupted, check_interrupted, install_signal_handlers
        install_signal_handlers()
        class Thing: pass
        inside = []
        def callback(_):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode: in here
            for _ in range(10000):
                inside.append(1)
        thing = Thing()
        ref = weakref.ref(thing, callback)
        try:
            del thing
            print("callback done")
            check_interrupted()
            print("not interrupted")
        except Interrupted as exc:
            print("interrupted after the callback:", exc.signum, len(inside))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, last = done.stdout.strip().splitlines()
    assert first == "callback done"
    said, signum, appended = last.rsplit(" ", 2)
    assert said == "interrupted after the callback:" and int(signum) == signal.SIGINT
    assert int(appended) < 10000  # the handler did run inside the callback, and stopped it there
    assert done.stderr == ""


def _files(directory: Path, skip=("manifest.json",)) -> dict:
    """relative path -> bytes of every file under `directory` but `skip` (which hold times)."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in skip}


def test_import_features_interrupted_by_sigint_resumes_to_identical_shards(tmp_path):
    from formats_fixtures import butd_row, make_records, write_tsv
    records = make_records([f"{i:06d}" for i in range(240)], dim=2048, boxes=(2, 4))
    tsv = write_tsv(tmp_path / "feats.tsv", [butd_row(s, r) for s, r in records.items()])
    out = tmp_path / "features"
    cmd = [sys.executable, "-m", "teranprep", "import-features", "butd-tsv", str(tsv), str(out),
           "--shard-size", "2", "--quiet"]
    line = _interrupt(cmd, lambda: len(list(out.glob("shards/regions-*.json"))) >= 3)
    assert "of 120 shards complete" in line, line
    kept = {p.name: p.read_bytes() for p in out.glob("shards/regions-*.h5")}
    assert 3 <= len(kept) < 120 and not (out / "manifest.json").exists()
    resumed = prep("import-features", "butd-tsv", tsv, out, "--shard-size", "2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name, data in kept.items():  # completed shards are kept, not redone
        assert (out / "shards" / name).read_bytes() == data
    fresh = prep("import-features", "butd-tsv", tsv, tmp_path / "fresh", "--shard-size", "2", "--quiet")
    assert fresh.returncode == 0, fresh.stderr
    assert _files(out) == _files(tmp_path / "fresh")


def test_eval_interrupted_by_sigint_in_the_relevance_matrix_resumes_to_the_same_matrix(tmp_path,
                                                                                       make_features):
    """SIGINT while eval computes the ROUGE-L relevance (6 row blocks of 1000 captions): one line
    naming the blocks kept; the resumed eval keeps them, and its matrix is the bytes of an
    uninterrupted computation's."""
    from teran_fixtures import CLS, DOT, SEP, make_tiny_bert, tiny_config, write_splits
    rng = np.random.default_rng(0)
    train_keys = [f"tr{i:04d}.jpg" for i in range(12)]
    test_keys = [f"te{i:04d}.jpg" for i in range(1500)]
    features, _ = make_features(train_keys + test_keys, n_boxes=3, dim=8, shard_size=500)

    def rows(keys, caps):
        return [(k, [CLS] + rng.integers(5, 40, int(rng.integers(6, 14))).tolist() + [DOT, SEP])
                for k in keys for _ in range(caps)]
    splits = write_splits(tmp_path / "splits", features, {"train": rows(train_keys, 2),
                                                          "val": rows(train_keys[:4], 2),
                                                          "test": rows(test_keys, 4)})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(make_tiny_bert(tmp_path / "bert"), epochs=1,
                                                 val_every=100000)))
    run = tmp_path / "run"
    trained = prep("train", splits, "--config", config, "--out", run, "--stop-after", 1)
    assert trained.returncode == 0, trained.stderr

    def cmd(cache, out):
        return [sys.executable, "-m", "teranprep", "eval", str(run), "--splits", str(splits),
                "--split", "test", "--relevance-cache", str(cache), "--out", str(out)]
    cache = tmp_path / "relevance"
    parts = cache / "test-rougeL.parts"
    line = _interrupt(cmd(cache, tmp_path / "e1"), lambda: len(list(parts.glob("rows-*.npy"))) >= 1)
    assert "of 6 ROUGE-L row blocks complete" in line, line
    kept = {p.name: p.read_bytes() for p in parts.glob("rows-*.npy")}
    assert 1 <= len(kept) < 6
    resumed = subprocess.run(cmd(cache, tmp_path / "e1"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{6 - len(kept)} of 6 row blocks to compute" in resumed.stdout + resumed.stderr
    fresh = subprocess.run(cmd(tmp_path / "fresh", tmp_path / "e2"), capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    assert (cache / "test-rougeL.npy").read_bytes() == (tmp_path / "fresh" / "test-rougeL.npy").read_bytes()


TINY_DETECTOR = {"epochs": 4, "images_per_batch": 2, "warmup_iters": 2, "threads": 1,
                 "eval": {"max_per_image": 20}, "rpn": {"batch": 32}, "roi": {"batch": 8},
                 "model_overrides": {"test_short": 128, "test_max": 192, "anchor_scales": [2.0, 4.0],
                                     "pre_nms_topk": 200, "post_nms_topk": 16, "pooler_resolution": 7}}


def test_train_detector_interrupted_by_sigint_resumes_to_the_uninterrupted_weights(tmp_path):
    import torch
    made = prep("make-synthetic", tmp_path / "data", "--images", 12, "--seed", 5, "--size", 64,
                "--val", 2, "--test", 1, "--image-format", "png")
    assert made.returncode == 0, made.stderr
    config = tmp_path / "det.yaml"
    config.write_text(yaml.safe_dump(TINY_DETECTOR))
    data = tmp_path / "data"

    def cmd(out):
        return [sys.executable, "-m", "teranprep", "train-detector", str(data / "instances.json"),
                str(data / "images"), "--config", str(config), "--out", str(out)]
    out = tmp_path / "det"
    line = _interrupt(cmd(out), lambda: (out / "last.pth").is_file())  # mid-way, after an epoch
    assert not (out / "model_final.pth").exists(), line
    resumed = subprocess.run(cmd(out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming after epoch" in resumed.stdout, resumed.stderr
    straight = subprocess.run(cmd(tmp_path / "straight"), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a = torch.load(out / "model_final.pth", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model_final.pth", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:  # the weights are the uninterrupted run's, bit for bit
        assert torch.equal(a["model"][key], b["model"][key]), key


# ------------------------------------------------------------ 5. a failed stage stays failed

def test_failed_stage_stays_failed_until_the_threshold_changes(tmp_path):
    images = tmp_path / "images"
    write_images(images, 3)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "empty.png").write_bytes(b"")
    out = tmp_path / "features"
    args = ["extract-regions", images, out, *TV, "--workers", "0", "--max-error-rate", "0"]
    first = assert_one_error(prep(*args), "2 of 5 images failed", "broken.jpg", "empty.png")
    before = tree(out)
    again = assert_one_error(prep(*args))
    assert again == first
    assert tree(out) == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(r["count"] for r in manifest["errors_by_reason"].values()) == 2
    relaxed = prep(*args[:-1], "0.5")
    assert relaxed.returncode == 0, relaxed.stderr
    assert "errors by reason" in relaxed.stdout
    verified = prep("verify", out)
    assert verified.returncode == 0, verified.stderr


# ------------------------------------------------------------ 6. discovery tells what it passed over

def test_discovery_counts_what_it_passed_over_and_never_walks_a_cycle(tmp_path):
    images = tmp_path / "images"
    keys = write_images(images, 3)
    (images / "anim.gif").write_bytes(b"GIF89a")
    (images / "notes.txt").write_text("x")
    (images / ".hidden.jpg").write_bytes((images / keys[0]).read_bytes())
    (images / ".cache").mkdir()
    write_images(images / ".cache", 2)
    (images / "sub" / "loop").symlink_to(images)  # a directory cycle
    (images / "again.png").symlink_to(images / keys[1])  # a second name for a listed image
    Image.new("RGB", (12, 9), (200, 10, 10)).save(images / "tiny.png")
    out = tmp_path / "features"
    proc = prep("extract-regions", images, out, "--model", "butd-tiny", "--random-weights", "0",
                "--workers", "0", "--quiet", "--max-error-rate", "0.5", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "passed over" in proc.stdout
    passed = json.loads((out / "manifest.json").read_text())["input"]["passed_over"]
    assert {k: v["count"] for k, v in passed.items()} == {
        "unsupported extension": 2, "hidden": 2, "symlink into the tree": 2}
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert sorted(index.index) == sorted(keys + ["tiny.png"])
    assert index.loc["tiny.png", "status"] == "error"
    assert "too small for the detector" in index.loc["tiny.png", "error"]


# ------------------------------------------------------------ 7. growing datasets

def test_added_images_go_into_new_shards_and_only_those_run(tmp_path):
    images = tmp_path / "images"
    write_images(images, 5)
    out = tmp_path / "features"
    args = ["extract-regions", images, out, *TV, "--workers", "0", "--shard-size", "2"]
    assert prep(*args).returncode == 0
    before = tree(out / "shards")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(images / "aaa-first.png")  # sorts before every key
    dry = prep(*args, "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout.count("[complete]") == 3 and dry.stdout.count("[new images]") == 1
    grown = prep(*args)
    assert grown.returncode == 0, grown.stderr
    assert "ran 1 of 4 shards" in grown.stdout
    after = tree(out / "shards")
    for name, value in before.items():
        if name.startswith("regions-"):
            assert after[name] == value, name  # bytes and mtime: never rewritten
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["aaa-first.png", "shard"] == "shards/regions-00003.h5"
    # a removed image re-runs only its own shard
    victim = index[index["shard"] == "shards/regions-00001.h5"].index[0]
    (images / victim).unlink()
    dry = prep(*args, "--dry-run")
    assert "[1 removed]" in dry.stdout and dry.stdout.count("[complete]") == 3
    shrunk = prep(*args)
    assert "ran 1 of 4 shards" in shrunk.stdout
    assert prep("verify", out).returncode == 0
    # --overwrite re-plans from scratch: 5 images, key order, 3 shards
    fresh = prep(*args, "--overwrite")
    assert fresh.returncode == 0 and "3 shards" in fresh.stdout
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["aaa-first.png", "shard"] == "shards/regions-00000.h5"


# ------------------------------------------------------------ 8. nothing silently ignored

def test_settings_that_change_numbers_are_fingerprinted_and_inapplicable_options_refused(features, tmp_path):
    images, feats = features
    before = tree(feats)
    base = ["extract-regions", images, feats, *TV, "--shard-size", "2", "--workers", "0"]
    used = json.loads((feats / "manifest.json").read_text())["devices"]["threads_per_task"][0]
    assert_one_error(prep(*base, "--threads-per-worker", used + 1), "other parameters", "--overwrite")
    assert_one_error(prep(*base, "--box-source", "regressed"), "--box-source applies to the BUTD")
    assert_one_error(prep(*base, "--d2-config", tmp_path / "x.yaml"), "--d2-config applies")
    assert tree(feats) == before
    tsv = tmp_path / "f.tsv"
    tsv.write_text("")
    assert_one_error(prep("import-features", "butd-tsv", tsv, tmp_path / "imp", "--sizes", tsv),
                     "--sizes applies to the teran format only")
    assert_one_error(prep("import-features", "butd-tsv", tsv, tmp_path / "imp", "--split", "train"),
                     "--split applies to scan-precomp only")
    assert prep(*base).returncode == 0  # the same settings again: a no-op, as before
    assert tree(feats) == before


def test_given_boxes_report_images_without_boxes_and_unmatched_keys(tmp_path):
    images = tmp_path / "images"
    keys = write_images(images, 3)
    boxes = {keys[0]: [[1, 1, 30, 30]], keys[1]: [[2, 3, 40, 50], [0, 0, 10, 10]],
             "not/an-image.jpg": [[0, 0, 5, 5]]}
    box_file = tmp_path / "boxes.json"
    box_file.write_text(json.dumps(boxes))
    out = tmp_path / "features"
    proc = prep("extract-regions", images, out, *TV, "--workers", "0", "--given-boxes", box_file,
                "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "1 keys match no image" in proc.stdout
    assert (out / "given_boxes_unmatched.txt").read_text().split() == ["not/an-image.jpg"]
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc[keys[2], "status"] == "error" and "no given boxes" in index.loc[keys[2], "error"]
    assert list(index.loc[[keys[0], keys[1]], "num_boxes"]) == [1, 2]
    strict = prep("extract-regions", images, tmp_path / "strict", *TV, "--workers", "0",
                  "--given-boxes", box_file)
    assert_one_error(strict, "1 of 3 images failed", "no given boxes")


def test_one_image_the_detector_rejects_costs_one_row_even_alone_in_its_batch(tmp_path):
    images = tmp_path / "images"
    write_images(images, 3)
    Image.new("RGB", (3000, 1), (9, 9, 9)).save(images / "zz-sliver.png")  # the detector raises on it
    out = tmp_path / "features"
    proc = prep("extract-regions", images, out, *TV, "--workers", "0", "--batch-size", "1",
                "--max-error-rate", "0.5")
    assert proc.returncode == 0, proc.stderr
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["zz-sliver.png", "status"] == "error"
    assert index.loc["zz-sliver.png", "error"].startswith("detector failed: RuntimeError")
    assert (index["status"] == "ok").sum() == 3
