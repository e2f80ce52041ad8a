"""Issue 19: no wrong answer goes out with exit 0. Each test runs the real `prep` in a subprocess
and asserts the exit code, exactly one `error:` line, no traceback and untouched earlier outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from formats_fixtures import butd_row, make_records, write_tsv
from search_fixtures import planted_run  # noqa: F401 (fixture)
from teran_fixtures import make_tiny_bert, random_dataset, tiny_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
REPO_CONFIGS = Path(__file__).parent.parent / "configs"  # links to the bundled configs


def prep(*args, timeout=900, env=None):
    """The installed command line in a fresh interpreter (what a user's shell runs)."""
    return subprocess.run([sys.executable, "-m", "teranprep", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**ENV, **(env or {})})


def one_error(proc, *needles, code=2) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def tree(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# ------------------------------------------------------------------ 1. non-finite values

def test_import_turns_nonfinite_inverted_and_outside_boxes_into_error_rows(tmp_path):
    records = make_records([f"{i}" for i in range(7)], dim=8, seed=3)
    records["1"]["features"][0, 3] = np.nan
    records["2"]["boxes"][1, 2] = np.inf
    records["3"]["boxes"][0] = [30, 10, 20, 40]                     # x2 < x1
    r4 = records["4"]
    records["4"]["boxes"][0] = [5, 5, r4["width"] + 20, 30]         # past the right edge
    records["5"]["features"][1, 0] = -np.inf
    lines = [butd_row(sid, r) for sid, r in records.items()]
    lines[6] = lines[6].replace(f"\t{records['6']['width']}\t", "\tnan\t", 1)  # a NaN size
    src = write_tsv(tmp_path / "feats.tsv", lines)
    out = tmp_path / "features"
    done = prep("import-features", "butd-tsv", src, out, "--quiet")
    assert done.returncode == 0, done.stderr
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["0", "status"] == "ok"
    reasons = index["error"].to_dict()
    assert (index.drop(index="0")["status"] == "error").all(), reasons
    assert "1 of" in reasons["1"] and "feature values are non-finite" in reasons["1"]
    assert "box coordinates are non-finite" in reasons["2"]
    assert "inverted" in reasons["3"] and "[30, 10, 20, 40]" in reasons["3"]
    assert "outside the" in reasons["4"] and "EXIF" in reasons["4"]
    assert "non-finite" in reasons["5"]
    assert "not a number" in reasons["6"]
    assert not any("detector" in reasons[k] for k in "12345"), reasons  # imported: not the detector's
    # Only the good image is in the shards, and verify --full finds no unusable value there.
    checked = prep("verify", out, "--full")
    assert checked.returncode == 0, checked.stderr
    # The same source with --max-error-rate 0: one line, nothing of the first import touched.
    before = tree(out)
    again = prep("import-features", "butd-tsv", src, tmp_path / "strict", "--max-error-rate", "0", "--quiet")
    one_error(again, "6 of 7 images failed", "--max-error-rate")
    assert tree(out) == before


@pytest.fixture
def nan_chain(tmp_path, make_features):
    """A tiny dataset, a YAML config, and which train caption row is first drawn at step 3."""
    splits, features = random_dataset(tmp_path, make_features)
    bert = make_tiny_bert(tmp_path / "bert")
    config = tiny_config(bert, batch_size=4, epochs=2, val_every=100, checkpoint_every=1)
    cfg = write_yaml(tmp_path / "tiny.yaml", config)
    return splits, features, cfg, config


def _first_fresh_image_at(step_index: int, n_rows: int, batch: int, seed: int, captions_per_image: int):
    """The image whose captions are first drawn by the sampler at batch `step_index` of epoch 0."""
    order = np.random.default_rng([seed, 0]).permutation(n_rows)
    earlier = {int(r) // captions_per_image for r in order[:step_index * batch]}
    fresh = [int(r) // captions_per_image for r in order[step_index * batch:(step_index + 1) * batch]
             if int(r) // captions_per_image not in earlier]
    return fresh[0] if fresh else None


def test_nan_chain_is_refused_at_the_first_stage_that_sees_it(tmp_path, make_features, nan_chain):
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import ShardReader
    splits, clean_features, cfg, config = nan_chain
    # 1. import: the NaN never reaches a shard (test above); 2. train on a store written by another
    # tool with one NaN box in an image first drawn at step 3: stopped there, steps 1-2 kept.
    step_index = next(s for s in range(2, 6) if _first_fresh_image_at(s, 24, 4, 7, 2) is not None)
    bad_image = _first_fresh_image_at(step_index, 24, 4, 7, 2)
    bad_key = f"img{bad_image:03d}.jpg"
    regions = []
    for shard in sorted((clean_features / "shards").glob("*.h5")):
        with ShardReader(shard) as reader:
            regions += [reader.read(i) for i in range(len(reader.image_keys))]
    for r in regions:
        if r.image_key == bad_key:
            r.boxes[0, 1] = np.nan
    nan_features = tmp_path / "nan-features"
    write_features(nan_features, regions, feature_dim=8, shard_size=2,
                   columns=("class_ids", "class_scores"), stage="other-tool")
    verified = prep("verify", nan_features, "--full")
    assert verified.returncode == 1 and bad_key in verified.stderr and "non-finite" in verified.stderr
    from teran_fixtures import write_splits
    nan_splits = write_splits(tmp_path / "nan-splits", nan_features, {
        name: [(k, list(ids)) for k, ids in zip(frame["image_key"], frame["input_ids"])]
        for name in ("train", "val", "test")
        for frame in [pd.read_parquet(splits / f"{name}.parquet")]})
    run = tmp_path / "run"
    done = prep("train", nan_splits, "--config", cfg, "--out", run)
    line = one_error(done, f"step {step_index + 1}", "non-finite", "boxes", "verify")
    assert f"step {step_index}" in line  # the last good checkpoint it kept
    import torch
    ckpt = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert ckpt["step"] == step_index
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    losses = [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == step_index and all(np.isfinite(losses))  # no NaN loss was recorded
    # 3. eval of a model whose weights are all NaN: refused, not R@1 100.
    for name, t in ckpt["model"].items():
        if t.is_floating_point():
            t.fill_(float("nan"))
    nan_run = tmp_path / "nan-run"
    nan_run.mkdir()
    torch.save(ckpt, nan_run / "checkpoint_best.pt")
    evaluated = prep("eval", nan_run, "--splits", splits, "--features", clean_features, "--no-ndcg")
    one_error(evaluated, "non-finite", "scores")
    assert not (nan_run / "eval-test-all" / "metrics.json").exists()
    # The same model indexed: refused before any index is written.
    indexed = prep("index", nan_run, "--features", clean_features, "--out", tmp_path / "index")
    one_error(indexed, "non-finite", "no index was written")
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_all_nan_scores_are_refused_where_ranks_would_give_recall_100():
    from teranprep.errors import PrepError
    from teranprep.teran.metrics import i2t_ranks, retrieval_metrics
    scores = np.full((3, 6), np.nan, np.float32)
    owner = np.repeat(np.arange(3), 2)
    assert (i2t_ranks(scores, owner) == 0).all()  # why: NaN >= NaN is false, so every rank is 0
    with pytest.raises(PrepError, match="18 of 18 scores are non-finite"):
        retrieval_metrics(scores, owner)


def test_search_refuses_nonfinite_scores_of_a_damaged_index(tmp_path, planted_run):
    import h5py
    index = tmp_path / "index"
    built = prep("index", planted_run["run"], "--features", planted_run["features"], "--out", index,
                 env={"TERANPREP_PROGRESS_SECONDS": "0"})
    assert built.returncode == 0, built.stderr
    n = len(pd.read_parquet(planted_run["features"] / "index.parquet"))
    progress = [l for l in built.stderr.splitlines() if l.startswith("index: ")]  # off a terminal
    assert progress and progress[-1].startswith(f"index: {n}/{n} img ({n} ok, 0 errors)"), built.stderr
    ok = prep("search", index, "w5 w6 w7", "--exhaustive", "--tokenizer", planted_run["tokenizer"])
    assert ok.returncode == 0, ok.stderr
    shard = sorted((index / "shards").glob("*.h5"))[0]
    with h5py.File(shard, "r+") as h5:
        h5["features"][0, 0] = np.nan
    found = prep("search", index, "w5 w6 w7", "--exhaustive", "--tokenizer", planted_run["tokenizer"])
    one_error(found, "non-finite", "verify")


# ------------------------------------------------------------------ 2. splits never leak

def _karpathy(path: Path, entries) -> Path:
    path.write_text(json.dumps({"images": [
        {"filename": name, "split": split, "sentences": [{"raw": f"a photo of thing {i}"},
                                                        {"raw": f"another thing {i}"}]}
        for i, (name, split) in enumerate(entries)]}))
    return path


def test_an_image_in_two_splits_is_refused_by_build_splits_and_reported_by_verify(tmp_path, make_features):
    features, _ = make_features([f"img{i}.jpg" for i in range(4)], n_boxes=2, dim=4)
    good = _karpathy(tmp_path / "good.json", [("img0.jpg", "train"), ("img1.jpg", "train"),
                                             ("img2.jpg", "val"), ("img3.jpg", "test")])
    out = tmp_path / "splits"
    assert prep("build-splits", good, "--features", features, "--out", out).returncode == 0
    before = tree(out)
    leaking = _karpathy(tmp_path / "leak.json", [("img0.jpg", "train"), ("img1.jpg", "train"),
                                                ("img2.jpg", "val"), ("img3.jpg", "test"),
                                                ("img1.jpg", "test")])
    refused = prep("build-splits", leaking, "--features", features, "--out", out, "--overwrite")
    one_error(refused, "1 images are in two splits", "'img1.jpg' (train and test)")
    assert tree(out) == before  # the earlier build is untouched
    # verify reads splits written by another tool through the same check, with the same words.
    frame = pd.read_parquet(out / "test.parquet")
    extra = pd.read_parquet(out / "train.parquet").head(1)
    pd.concat([frame, extra]).to_parquet(out / "test.parquet", index=False)
    checked = prep("verify", out)
    assert checked.returncode == 1
    assert "1 images are in two splits: 'img0.jpg' (train and test)" in checked.stderr
    assert "caption_id is not unique across splits (1 repeated ids): e.g. 0" in checked.stderr


def test_split_leaks_names_examples_for_both_kinds():
    from teranprep.manifests.splits import split_leaks
    rows = [("train", "a", 0), ("val", "b", 1), ("test", "a", 2), ("test", "c", 1)]
    assert split_leaks(rows) == ["1 images are in two splits: 'a' (train and test)",
                                 "caption_id is not unique across splits (1 repeated ids): e.g. 1"]
    assert split_leaks([("train", "a", 0), ("train", "a", 1)]) == []


# ------------------------------------------------------------------ 3. one writer per output folder

TV = ["--model", "tv-frcnn-mbv3-320", "--random-weights", "0", "--quiet"]
LOCKED = "another prep run is writing this folder"


def race(args_a, args_b, timeout=900):
    """Two real `prep` processes started together; their CompletedProcess-like results."""
    procs = [subprocess.Popen([sys.executable, "-m", "teranprep", *map(str, args)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in (args_a, args_b)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return results


def assert_one_writer(results, *, success: str, noop: str, refusals=(LOCKED,)):
    """At least one run did the work; the other either was refused in one line naming the
    running process, or (started after the first had finished) reported that nothing was left."""
    assert any(r.returncode == 0 and success in r.stdout for r in results), results
    for r in results:
        if r.returncode != 0:
            line = one_error(r)
            assert any(reason in line for reason in refusals), line
            if LOCKED in line:
                assert "pid " in line and "prep " in line, line
            assert success not in r.stdout, r.stdout  # no summary of work it did not do
    if all(r.returncode == 0 for r in results):
        assert sum(noop in r.stdout for r in results) == 1, results


def _images(tmp_path):
    from conftest import write_images
    images = tmp_path / "images"
    write_images(images, 3)
    return images


def test_two_extracts_started_together_have_one_writer(tmp_path):
    images, out = _images(tmp_path), tmp_path / "features"
    args = ["extract-regions", images, out, *TV, "--workers", "0"]
    assert_one_writer(race(args, args), success="ran 1 of 1 shards", noop="nothing to do")
    assert prep("verify", out).returncode == 0


def test_two_imports_started_together_have_one_writer(tmp_path):
    src = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in make_records(list("abcd")).items()])
    args = ["import-features", "butd-tsv", src, tmp_path / "features", "--quiet"]
    assert_one_writer(race(args, args), success="wrote", noop="nothing to do")


def test_two_build_splits_started_together_have_one_writer(tmp_path, make_features):
    features, _ = make_features([f"img{i}.jpg" for i in range(4)], n_boxes=2, dim=4)
    captions = _karpathy(tmp_path / "c.json", [("img0.jpg", "train"), ("img1.jpg", "train"),
                                               ("img2.jpg", "val"), ("img3.jpg", "test")])
    args = ["build-splits", captions, "--features", features, "--out", tmp_path / "splits"]
    assert_one_writer(race(args, args), success="build-splits: wrote", noop="up to date")


def test_a_train_started_while_another_trains_into_its_folder_is_refused_and_the_first_is_untouched(
        tmp_path, nan_chain):
    """A true overlap: the second `prep train` starts once the first has printed a step line (so
    it holds the folder's lock and trains) and is held mid-run by SIGSTOP until the second has
    asked for the lock. The second: one line naming the first's pid. The first then finishes as a
    solo run would, to the same losses and weights."""
    import signal
    import torch
    splits, _, _, config = nan_chain
    cfg = write_yaml(tmp_path / "long.yaml", dict(config, training=dict(config["training"], epochs=6)))
    run = tmp_path / "run"
    args = ["train", splits, "--config", cfg, "--out", run]
    every = {"TERANPREP_PROGRESS_SECONDS": "0"}  # a step line at every step
    with open(tmp_path / "first.err", "w") as first_err:
        first = subprocess.Popen([sys.executable, "-m", "teranprep", *map(str, args)], env={**ENV, **every},
                                 stdout=subprocess.PIPE, stderr=first_err, text=True)
        try:
            lines = [first.stdout.readline()]
            while lines[-1] and not lines[-1].startswith("step "):
                lines.append(first.stdout.readline())
            assert lines[-1].startswith("step 1/36: "), lines  # training: its lock was taken before
            first.send_signal(signal.SIGSTOP)
            _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once it is stopped (or gone)
            assert os.WIFSTOPPED(status), status  # stopped mid-run, not finished
            second = prep(*args, env=every)
        finally:
            first.send_signal(signal.SIGCONT)
        rest = first.stdout.read()
        first.wait(timeout=600)
    one_error(second, LOCKED, f"pid {first.pid}", "prep train")
    assert second.stdout == "", second.stdout  # no summary of work it did not do
    assert first.returncode == 0, (tmp_path / "first.err").read_text()
    assert f"{run}: 36 steps" in rest, rest
    solo = prep(*args[:-1], tmp_path / "solo")
    assert solo.returncode == 0 and "36 steps" in solo.stdout, solo.stderr

    def losses(folder):
        return [{k: v for k, v in json.loads(l).items() if k not in ("data_wait_share", "step_s", "time")}
                for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert losses(run) == losses(tmp_path / "solo")
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        a = torch.load(run / name, weights_only=True)["model"]
        b = torch.load(tmp_path / "solo" / name, weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (run / "config.yaml").read_bytes() == (tmp_path / "solo" / "config.yaml").read_bytes()


def test_two_indexes_started_together_have_one_writer(tmp_path, planted_run):
    args = ["index", planted_run["run"], "--features", planted_run["features"], "--out", tmp_path / "index"]
    assert_one_writer(race(args, args), success="1 shard(s) encoded", noop="nothing to do")


def test_a_held_lock_refuses_with_the_holders_pid_and_is_freed_when_it_dies(tmp_path):
    src = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in make_records(list("ab")).items()])
    out = tmp_path / "features"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from teranprep.manifests.ownership import "
         "lock_output_dir; lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
         str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(out)
        refused = prep("import-features", "butd-tsv", src, out)
        one_error(refused, LOCKED, f"pid {holder.pid}")
        assert tree(out) == before and "wrote" not in refused.stdout
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
        holder.wait()
    done = prep("import-features", "butd-tsv", src, out, "--quiet")
    assert done.returncode == 0 and "wrote 1 of 1 shards" in done.stdout, done.stderr


# ------------------------------------------------------------------ 5. manifests tell the truth

def _splits_for(tmp_path, features, like_splits, name):
    """splits/ (by another tool) with the captions of `like_splits`, tied to `features`."""
    from teran_fixtures import write_splits
    return write_splits(tmp_path / name, features, {
        split: [(k, list(ids)) for k, ids in zip(frame["image_key"], frame["input_ids"])]
        for split in ("train", "val", "test")
        for frame in [pd.read_parquet(like_splits / f"{split}.parquet")]})


def test_a_hand_edited_manifest_fails_verify_and_train_refuses_it(tmp_path, nan_chain):
    splits, features, cfg, _ = nan_chain
    manifest = json.loads((features / "manifest.json").read_text())
    manifest.update(feature_dim=16, dtype="float16")
    (features / "manifest.json").write_text(json.dumps(manifest))
    checked = prep("verify", features)
    assert checked.returncode == 1
    assert "the manifest says 16" in checked.stderr and "the manifest says dtype 'float16'" in checked.stderr
    edited_splits = _splits_for(tmp_path, features, splits, "edited-splits")
    trained = prep("train", edited_splits, "--config", cfg, "--out", tmp_path / "run")
    one_error(trained, "8-d features", "the manifest says 16", "prep verify")
    assert not (tmp_path / "run").exists()


def test_a_failed_import_is_marked_failed_and_refused_downstream(tmp_path, nan_chain, planted_run):
    splits, _, cfg, _ = nan_chain
    records = make_records([f"img{i:03d}.jpg" for i in range(16)], dim=8, seed=1)
    lines = [butd_row(s, r) for s, r in records.items()]
    lines[3] = lines[3].split("\t", 1)[0] + "\tbroken"
    src = write_tsv(tmp_path / "f.tsv", lines)
    out = tmp_path / "imported"
    failed = prep("import-features", "butd-tsv", src, out, "--max-error-rate", "0", "--quiet")
    one_error(failed, "1 of 16 images failed")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "1 of 16 images failed" in manifest["failure"]
    checked = prep("verify", out)
    assert checked.returncode == 1 and "run that wrote it failed" in checked.stderr
    before = tree(out)
    captions = _karpathy(tmp_path / "c.json", [(f"img{i:03d}.jpg", "train") for i in range(16)])
    built = prep("build-splits", captions, "--features", out, "--out", tmp_path / "splits")
    one_error(built, "written by a failed import-features run", "--max-error-rate")
    trained = prep("train", _splits_for(tmp_path, out, splits, "other-splits"), "--config", cfg,
                   "--out", tmp_path / "run")
    one_error(trained, "written by a failed import-features run")
    indexed = prep("index", planted_run["run"], "--features", out, "--out", tmp_path / "index")
    one_error(indexed, "written by a failed import-features run")
    assert tree(out) == before
    # The same import with a limit it passes clears the mark; the manifest is as if never failed.
    passed = prep("import-features", "butd-tsv", src, out, "--max-error-rate", "0.1", "--quiet")
    assert passed.returncode == 0 and "nothing to do" in passed.stdout, passed.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert "status" not in manifest and "failure" not in manifest
    assert prep("verify", out).returncode == 0


# ------------------------------------------------------------------ 6. every crash a user can reach is one line

@pytest.mark.parametrize("args", [
    ["eval", "run", "--splits", "s", "--batch-size", "0"],
    ["extract-regions", "images", "out", "--batch-size", "0"],
    ["index", "run", "--features", "f", "--out", "o", "--batch-size", "0"],
    ["train-shortlist", "run", "--batch-size", "0"],
    ["search", "index", "a dog", "-k", "0"],
    ["search", "index", "a dog", "-k", "1001"],
    ["search", "index", "a dog", "--shortlist", "0"],
    ["build-splits", "c.json", "--features", "f", "--out", "o", "--max-tokens", "2"],
])
def test_bad_option_values_are_refused_at_parse_time(tmp_path, args):
    before = sorted(tmp_path.iterdir())
    line = one_error(prep(*args))
    assert "Invalid value" in line and "--help" in line
    assert sorted(tmp_path.iterdir()) == before


def test_search_limits_in_help_are_the_pipelines():
    from teranprep.pipeline.search import DEFAULT_SHORTLIST, MAX_K
    shown = " ".join(prep("search", "--help").stdout.split())
    assert f"1<=x<={MAX_K}" in shown and f"(1..{MAX_K})" in shown
    assert f"[default: {DEFAULT_SHORTLIST}]" in shown and "[x>=1]" in shown


def _with_val(tmp_path, splits, features, val_rows: int | None, name: str) -> Path:
    """A copy of `splits` whose val split keeps only its first `val_rows` images' captions."""
    import shutil
    copy = tmp_path / name
    shutil.copytree(splits, copy)
    frame = pd.read_parquet(splits / "val.parquet")
    keep = list(dict.fromkeys(frame["image_key"]))[:val_rows]
    frame[frame["image_key"].isin(keep)].to_parquet(copy / "val.parquet", index=False)
    return copy


def test_an_empty_val_split_trains_without_validation_and_warns(tmp_path, nan_chain):
    splits, features, cfg, _ = nan_chain
    empty = _with_val(tmp_path, splits, features, 0, "empty-val")
    run = tmp_path / "run"
    done = prep("train", empty, "--config", cfg, "--out", run, "--stop-after", "4")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "val.parquet is empty: training runs without validation" in done.stderr
    assert (run / "checkpoint_last.pt").is_file() and not (run / "checkpoint_best.pt").exists()
    assert "best validation rsum n/a" in done.stdout
    one = _with_val(tmp_path, splits, features, 1, "one-val")
    done = prep("train", one, "--config", cfg, "--out", tmp_path / "run1", "--stop-after", "1")
    assert done.returncode == 0, done.stderr
    assert "has 1 image" in done.stderr and "best-checkpoint selection is meaningless" in done.stderr


def test_captions_longer_than_the_encoder_and_resume_with_another_config(tmp_path, nan_chain):
    from teran_fixtures import CLS, DOT, SEP, write_splits, write_tiny_tokenizer
    splits, features, cfg, config = nan_chain
    frames = {s: pd.read_parquet(splits / f"{s}.parquet") for s in ("train", "val", "test")}
    rows = {s: [(k, list(ids)) for k, ids in zip(f["image_key"], f["input_ids"])] for s, f in frames.items()}
    rows["train"][5] = (rows["train"][5][0], [CLS] + [7] * 37 + [DOT, SEP])  # 40 > 32 positions
    long_splits = write_splits(tmp_path / "long-splits", features, rows)
    refused = prep("train", long_splits, "--config", cfg, "--out", tmp_path / "long-run")
    one_error(refused, "has 40 tokens", "32 positions", "--max-tokens 32")
    assert not (tmp_path / "long-run").exists()
    # --resume with another --config: refused with the differences; with the same: resumed.
    run = tmp_path / "run"
    assert prep("train", splits, "--config", cfg, "--out", run, "--stop-after", "1").returncode == 0
    before = tree(run)
    other = dict(config, training=dict(config["training"], lr=0.01))
    other_cfg = write_yaml(tmp_path / "other.yaml", other)
    line = one_error(prep("train", splits, "--config", other_cfg, "--out", run, "--resume"),
                     "--config differs", "training.lr: 0.001 -> 0.01")
    assert tree(run) == before, line
    resumed = prep("train", splits, "--config", cfg, "--out", run, "--resume", "--stop-after", "2")
    assert resumed.returncode == 0 and "2 steps" in resumed.stdout, resumed.stderr
    # show-alignment with a caption longer than the text encoder's positions: one line.
    tok = write_tiny_tokenizer(tmp_path / "tok")
    key = frames["train"]["image_key"][0]
    shown = prep("show-alignment", run, key, " ".join(["w7"] * 40), "-o", tmp_path / "a.png",
                 "--splits", splits, "--tokenizer", tok)
    one_error(shown, "42 word pieces", "at most 32", "shorten")
    assert not (tmp_path / "a.png").exists()


# ------------------------------------------------------------------ 4. inputs that changed are noticed

def test_verify_notices_an_image_rewritten_with_its_size_and_mtime_kept(tmp_path):
    images, out = _images(tmp_path), tmp_path / "features"
    assert prep("extract-regions", images, out, *TV, "--workers", "0").returncode == 0
    assert prep("verify", out).returncode == 0
    victim = sorted(images.rglob("*.png"))[0]
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF  # same size; `cp -p` / `rsync -t` keep the mtime too
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    checked = prep("verify", out)
    assert checked.returncode == 1
    key = victim.relative_to(images).as_posix()
    assert "changed since extraction" in checked.stderr and repr(key) in checked.stderr


def test_verify_inputs_reruns_only_the_shard_whose_image_changed_in_place(tmp_path):
    """A rewrite that keeps size and mtime: a plain resume cannot tell; --verify-inputs re-hashes,
    says which shard changed in its dry run, re-runs that shard only and records the new sha256."""
    import hashlib
    from PIL import Image
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):  # stored PNGs (no compression): the file size depends on the size only
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(images / f"im{i}.png",
                                                                                 compress_level=0)
    out = tmp_path / "features"
    args = ("extract-regions", images, out, *TV, "--workers", "0", "--shard-size", "2")
    assert prep(*args).returncode == 0
    shard = lambda i: out / "shards" / f"regions-0000{i}.h5"  # noqa: E731
    before = [(shard(i).read_bytes(), shard(i).stat().st_mtime_ns) for i in (0, 1)]
    victim = images / "im3.png"
    stat = victim.stat()
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(victim, compress_level=0)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns

    plain = prep(*args)
    assert plain.returncode == 0 and "nothing to do: every shard was already complete" in plain.stdout, plain.stdout
    dry = prep(*args, "--verify-inputs", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "regions-00001.h5" in dry.stdout and "[1 changed content (sha256)]" in dry.stdout, dry.stdout
    assert dry.stdout.count("[complete]") == 1, dry.stdout
    rerun = prep(*args, "--verify-inputs")
    assert rerun.returncode == 0 and "ran 1 of 2 shards" in rerun.stdout, rerun.stdout + rerun.stderr
    assert (shard(0).read_bytes(), shard(0).stat().st_mtime_ns) == before[0]
    assert shard(1).read_bytes() != before[1][0]
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["im3.png", "file_sha256"] == hashlib.sha256(victim.read_bytes()).hexdigest()
    assert prep("verify", out).returncode == 0
    again = prep(*args, "--verify-inputs")
    assert again.returncode == 0 and "nothing to do: every shard was already complete" in again.stdout, again.stdout


def test_max_megapixels_names_the_limit_and_raising_it_reads_the_image(tmp_path):
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (2000, 1500), (120, 30, 60)).save(images / "big.png")
    Image.new("RGB", (80, 64), (20, 90, 60)).save(images / "small.png")
    out = tmp_path / "features"
    base = ("extract-regions", images, out, *TV, "--workers", "0", "--max-error-rate", "1")
    assert prep(*base, "--max-megapixels", "2").returncode == 0
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    assert index.loc["big.png", "status"] == "error" and index.loc["small.png", "status"] == "ok"
    assert index.loc["big.png", "error"].endswith(
        "image too large (2000 x 1500, limit 2 megapixels; --max-megapixels to raise)"), index.loc["big.png", "error"]
    before = tree(out)
    # which images are errors is a parameter of the folder: another limit is refused, not mixed
    one_error(prep(*base, "--max-megapixels", "4"), "--overwrite")
    assert tree(out) == before
    assert prep(*base, "--max-megapixels", "4", "--overwrite").returncode == 0
    assert set(pd.read_parquet(out / "index.parquet")["status"]) == {"ok"}
    one_error(prep(*base, "--max-megapixels", "0"), "--max-megapixels must be > 0")


# ------------------------------------------------------------------ 7. messages a user can act on

def test_show_regions_keeps_keys_apart_and_names_an_unknown_key(tmp_path, make_features):
    from PIL import Image
    from teranprep.pipeline.regions import png_name
    keys = ["a/b.png", "a__b.png", "a_/b.png", "a/_b.png", "x%2F.png"]
    assert len({png_name(k) for k in keys}) == len(keys)
    assert png_name("train2014/x.jpg") == "train2014__x.jpg.png"  # plain keys keep their old name
    features, _ = make_features(keys, n_boxes=2, dim=4)
    root = tmp_path / "root"
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 120), (30, 60, 90)).save(root / key)
    out = tmp_path / "png"
    drawn = prep("show-regions", features, *keys, "-o", out, "--images", root)
    assert drawn.returncode == 0, drawn.stderr
    assert len(list(out.glob("*.png"))) == len(keys)
    before = tree(out)
    unknown = prep("show-regions", features, "nope.jpg", "-o", out, "--images", root)
    one_error(unknown, "'nope.jpg' is not in this features folder")
    assert tree(out) == before


def test_keys_that_differ_only_in_unicode_form_are_named_as_such(tmp_path, make_features):
    import unicodedata
    nfd = unicodedata.normalize("NFD", "café.jpg")
    nfc = unicodedata.normalize("NFC", "café.jpg")
    assert nfd != nfc
    features, _ = make_features([nfd, "img1.jpg", "img2.jpg"], n_boxes=2, dim=4)
    captions = _karpathy(tmp_path / "c.json", [(nfc, "train"), ("img1.jpg", "val"), ("img2.jpg", "test")])
    refused = prep("build-splits", captions, "--features", features, "--out", tmp_path / "splits")
    one_error(refused, "differ from a features key only in Unicode normalization (NFC vs NFD)",
              ascii(nfc), ascii(nfd))


# ------------------------------------------------------------------ 8. --quiet means the same everywhere

def test_quiet_train_and_eval_print_only_their_summary_line(tmp_path, nan_chain):
    splits, features, _, config = nan_chain
    cfg = write_yaml(tmp_path / "val.yaml", dict(config, training=dict(config["training"], val_every=2)))
    run = tmp_path / "run"
    loud = prep("train", splits, "--config", cfg, "--out", tmp_path / "loud", "--stop-after", "2")
    assert loud.returncode == 0 and "val rsum" in loud.stdout, loud.stderr  # a validation line
    done = prep("train", splits, "--config", cfg, "--out", run, "--stop-after", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{run}: 2 steps, best validation rsum "
                                        f"{json.loads((run / 'metrics.jsonl').read_text().splitlines()[-1])['rsum']:.2f}"]
    # with NDCG: its ROUGE-L relevance is computed here, and prints no progress line either
    evaluated = prep("eval", run, "--splits", splits, "--quiet", env={"TERANPREP_PROGRESS_SECONDS": "0"})
    assert evaluated.returncode == 0, evaluated.stderr
    assert (splits.parent / "splits-relevance" / "test-rougeL.npy").is_file()  # it was computed
    assert not any(l.startswith("relevance") for l in evaluated.stderr.splitlines()), evaluated.stderr
    metrics = json.loads((run / "eval-test-all" / "metrics.json").read_text())
    assert evaluated.stdout.splitlines() == [
        f"test (all): rsum {metrics['rsum']:.1f}, i2t R@1 {metrics['i2t']['r1']:.1f}, "
        f"t2i R@1 {metrics['t2i']['r1']:.1f}"]
    for command in ("extract-regions", "import-features", "export-features", "build-splits", "train",
                    "eval", "index", "train-shortlist", "make-synthetic", "train-detector", "verify"):
        assert "--quiet" in prep(command, "--help").stdout, command


# ------------------------------------------------------------------ 9. --help tells the truth

def test_every_option_has_help_and_every_default_is_shown_as_its_value():
    import click
    from teranprep.cli import main
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, (name, param.opts)
                if not param.is_flag and param.default not in (None, ()) and \
                        type(param.default).__name__ != "Sentinel":
                    assert param.show_default, (name, param.opts)
        shown = prep(name, "--help")
        assert shown.returncode == 0 and "(dynamic)" not in shown.stdout, (name, shown.stdout)


def test_progress_lines_off_a_terminal_for_import_and_train(tmp_path, nan_chain):
    splits, features, cfg, _ = nan_chain
    src = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in make_records(list("abcd")).items()])
    every = {"TERANPREP_PROGRESS_SECONDS": "0"}  # a line at every update: the lines are what is tested
    imported = prep("import-features", "butd-tsv", src, tmp_path / "imported", "--shard-size", "2", env=every)
    trained = prep("train", splits, "--config", cfg, "--out", tmp_path / "run", "--stop-after", "3", env=every)
    quiet = prep("train", splits, "--config", cfg, "--out", tmp_path / "q", "--stop-after", "3", "--quiet",
                 env=every)
    assert imported.returncode == 0, imported.stderr
    lines = [l for l in imported.stderr.splitlines() if l.startswith("import-features: ")]
    assert lines and lines[-1].startswith("import-features: 4/4 img (4 ok, 0 errors)") and "ETA" in lines[-1]
    assert trained.returncode == 0, trained.stderr
    steps = [l for l in trained.stdout.splitlines() if l.startswith("step ")]
    assert any(l.startswith("step 3/3: loss ") and "steps/s, ETA" in l for l in steps), trained.stdout
    assert quiet.returncode == 0 and len(quiet.stdout.splitlines()) == 1, quiet.stdout


def test_progress_lines_off_a_terminal_for_the_relevance_computation(tmp_path, planted_run):
    """eval's ROUGE-L relevance: a plain line per report inside a row block (every REPORT_ROWS
    captions and at its end) off a terminal (--quiet drops them: the quiet test above)."""
    import re
    from teranprep.pipeline.relevance import REPORT_ROWS
    p = planted_run
    n = len(pd.read_parquet(p["splits"] / "test.parquet"))
    assert n > 2 * REPORT_ROWS  # more than one report inside the one block of this split
    every = {"TERANPREP_PROGRESS_SECONDS": "0"}  # a line at every update: the lines are what is tested

    loud = prep("eval", p["run"], "--splits", p["splits"], "--relevance-cache", tmp_path / "rel",
                "--out", tmp_path / "eval", env=every)
    assert loud.returncode == 0, loud.stderr
    line = re.compile(r"relevance: (\d+)/(\d+) captions, \d+\.\d\d captions/s, ETA (\d+m\d\ds|\?)$")
    found = [line.match(l) for l in loud.stderr.splitlines() if l.startswith("relevance: ") and "/" in l.split()[1]]
    assert found and all(found), loud.stderr
    assert [int(m[1]) for m in found] == [*range(REPORT_ROWS, n, REPORT_ROWS), n], loud.stderr
    assert {int(m[2]) for m in found} == {n}


def test_config_errors_list_only_teran_configs(tmp_path):
    for name in ("nosuch", "detector_tiny"):
        line = one_error(prep("train", tmp_path, "--config", name, "--out", tmp_path / "run"),
                         "['teran_coco', 'teran_coco_vinvl', 'teran_f30k', 'teran_small']")
        assert "detector_tiny'" not in line.split("one of")[-1]
    # by path too (the repo's configs/ links to the bundled files): named as the wrong kind
    line = one_error(prep("train", tmp_path, "--config", REPO_CONFIGS / "detector_tiny.yaml", "--out",
                          tmp_path / "run"), "another kind (for `prep train-detector --config`)")
    assert not (tmp_path / "run").exists()


def test_train_detector_config_errors_list_only_detector_configs(tmp_path):
    def train_detector(config):
        return prep("train-detector", tmp_path / "instances.json", tmp_path, "--config", config,
                    "--out", tmp_path / "det")
    for given in ("nosuch", "teran_small", "teran_coco.yaml", REPO_CONFIGS / "teran_small.yaml"):
        line = one_error(train_detector(given), f"{given}: ", "one of ['detector_tiny']")
        assert "teran_" not in line.split("one of")[-1], line
        if given != "nosuch":  # a TERAN config: named as the wrong kind, with the command it is for
            assert "a bundled config of another kind (for `prep train --config`), not a detector config" in line
    assert not (tmp_path / "det").exists()
    # the bundled detector config by its name is taken: the next complaint is the missing annotations
    one_error(train_detector("detector_tiny"), "instances.json", "COCO")


def test_error_reasons_group_counts_but_keep_the_words_readable():
    from teranprep.manifests.error_summary import error_reason
    assert error_reason("k", "feature value 7e+05 is out of float16 range; use --dtype float32") == \
        "feature value 7e+05 is out of float16 range; use --dtype float32"
    assert error_reason("k", "image too small for the detector 10x12 px") == "image too small for the detector NxN px"
    assert error_reason("k", "3 of 80 feature values are non-finite (NaN/inf)") == "N of N feature values are non-finite"
    assert error_reason("k", "invalid utf-8 in regions-00003.h5") == "invalid utf-8 in regions-00003.h5"


def test_a_grown_shard_is_not_called_truncated(tmp_path, make_features):
    features, _ = make_features(["a.jpg", "b.jpg"], n_boxes=2, dim=4)
    shard = sorted((features / "shards").glob("*.h5"))[0]
    with open(shard, "ab") as fh:
        fh.write(b"\0" * 10)
    checked = prep("verify", features)
    assert checked.returncode == 1
    assert "(grown: written to after the run?)" in checked.stderr and "truncated" not in checked.stderr


def test_quiet_means_errors_warnings_and_the_summary_line_on_every_other_stage(tmp_path, planted_run):
    """make-synthetic, train-detector, extract-regions, verify, index and train-shortlist: --quiet drops every line
    but the summary (the same summary the loud run ends with; some summaries take a few lines)."""
    p = planted_run
    runs = {
        "make-synthetic": lambda out: ("make-synthetic", out, "--images", "6", "--seed", "1"),
        "train-detector": lambda out: ("train-detector", tmp_path / "syn0" / "instances.json",
                                       tmp_path / "syn0" / "images", "--config",
                                       REPO_CONFIGS / "detector_tiny.yaml", "--epochs", "1", "--out", out),
        "extract-regions": lambda out: ("extract-regions", tmp_path / "syn0" / "images", out, "--model",
                                        "tv-frcnn-mbv3-320", "--random-weights", "0"),
        "verify": lambda out: ("verify", p["features"]),
        "index": lambda out: ("index", p["run"], "--features", p["features"], "--out", out),
        "train-shortlist": lambda out: ("train-shortlist", p["run"], "--out", out, "--epochs", "1",
                                        "--dim", "8"),
    }
    assert prep(*runs["make-synthetic"](tmp_path / "syn0")).returncode == 0
    every = {"TERANPREP_PROGRESS_SECONDS": "0"}  # progress lines off a terminal at every update
    for stage, argv in runs.items():
        loud = prep(*argv(tmp_path / f"{stage}-loud"), env=every)
        quiet = prep(*argv(tmp_path / f"{stage}-quiet"), "--quiet", env=every)
        assert loud.returncode == 0 and quiet.returncode == 0, (stage, loud.stderr[-800:], quiet.stderr[-800:])
        loud_lines, quiet_lines = loud.stdout.splitlines(), quiet.stdout.splitlines()
        assert quiet_lines, (stage, quiet.stdout)
        if stage == "extract-regions":  # its progress lines off a terminal (6 synthetic images)
            lines = [l for l in loud.stderr.splitlines() if l.startswith("extract-regions: ")]
            assert lines and lines[-1].startswith("extract-regions: 6/6 img (6 ok, 0 errors), ") and \
                "ETA" in lines[-1], loud.stderr
            assert "extract-regions: " not in quiet.stderr, quiet.stderr
        if stage not in ("make-synthetic", "verify"):  # loud, these print their summary only here
            said = lambda proc: len((proc.stdout + proc.stderr).splitlines())
            assert said(loud) > said(quiet), (stage, loud.stdout, loud.stderr, quiet.stdout, quiet.stderr)
        # quiet prints the loud run's closing summary (which names its own folder), nothing else
        import re

        def same(line, suffix):  # its folder's name, wall times and rates aside
            return re.sub(r"\d+\.\d+|\d+ ?s\b", "T", line.replace(suffix, ""))
        tail = [same(line, "-loud") for line in loud_lines[-len(quiet_lines):]]
        assert [same(line, "-quiet") for line in quiet_lines] == tail, (stage, loud.stdout, quiet.stdout)


def test_a_stage_called_from_python_drops_its_folder_lock_when_it_returns(tmp_path):
    """The Python API (a notebook, run_demo) must not keep a folder locked against the `prep` that
    runs next; a lock taken before the call (an enclosing stage's) stays held."""
    from teranprep.manifests import ownership
    from teranprep.pipeline.synthetic import make_synthetic
    out = tmp_path / "syn"
    make_synthetic(out, images=4, seed=1)
    assert os.path.realpath(out) not in ownership._held_locks
    again = prep("make-synthetic", out, "--images", "4", "--seed", "1")
    assert again.returncode == 0, again.stderr
    outer = tmp_path / "outer"
    outer.mkdir()
    ownership.lock_output_dir(outer)
    try:
        make_synthetic(outer, images=4, seed=1)
        assert os.path.realpath(outer) in ownership._held_locks
        one_error(prep("make-synthetic", outer, "--images", "4", "--seed", "1"), "another prep run")
    finally:
        ownership.release_output_locks()
