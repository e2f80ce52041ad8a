"""prep train: run outputs, bit-for-bit resume, lineage refusal."""

from __future__ import annotations

import json

import pytest
import yaml

from teran_fixtures import make_tiny_bert, random_dataset, tiny_config, one_thread  # noqa: F401 (autouse)
from teranprep.errors import PrepError
from teranprep.pipeline.train import BEST, LAST, load_checkpoint, train


def _train_losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.fixture
def dataset(tmp_path, make_features):
    splits, features = random_dataset(tmp_path, make_features)
    return splits, features, make_tiny_bert(tmp_path / "bert")


def test_train_writes_config_checkpoints_metrics_and_plot(tmp_path, dataset):
    splits, features, bert = dataset
    run = tmp_path / "run"
    result = train(splits, tiny_config(bert), run, echo=lambda *_: None)
    assert result.step == 12  # 24 captions / batch 4 = 6 steps x 2 epochs
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["batch_size"] == 4
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 8, 12]
    val = [r for r in records if r["kind"] == "val"][-1]
    assert set(val["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert (run / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last, best = load_checkpoint(run / LAST), load_checkpoint(run / BEST)
    assert last["step"] == 12 and best["validation"]["rsum"] == result.best_rsum
    assert best["lineage"]["splits_manifest_sha256"] == last["lineage"]["splits_manifest_sha256"]
    # lr used by each step: linear warm-up over 3 steps, then x0.5 from epoch 2 (step 7 on).
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert [lrs[s] for s in (1, 2, 3, 6, 7, 12)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 5e-4, 5e-4])


@pytest.mark.threads
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, dataset):
    splits, features, bert = dataset
    quiet = lambda *_: None  # noqa: E731
    full = train(splits, tiny_config(bert), tmp_path / "full", echo=quiet)
    # Interrupted after 5 steps (mid-epoch, past the step-4 validation), then resumed.
    part = train(splits, tiny_config(bert), tmp_path / "part", stop_after=5, echo=quiet)
    assert part.step == 5
    with pytest.raises(PrepError, match="--resume"):
        train(splits, tiny_config(bert), tmp_path / "part", echo=quiet)
    # A kill after step 6 was logged but before any checkpoint: resume redoes step 6.
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": 6, "epoch": 0, "loss": -1.0, "lr": 0}) + "\n")
    resumed = train(splits, None, tmp_path / "part", resume=True, echo=quiet)
    assert resumed.step == 12
    assert _train_losses(tmp_path / "part") == _train_losses(tmp_path / "full")
    assert len(set(l for _, l in _train_losses(tmp_path / "full"))) > 6  # losses really move
    assert resumed.best_rsum == full.best_rsum


def test_train_refuses_splits_whose_features_changed(tmp_path, dataset):
    splits, features, bert = dataset
    manifest = features / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"test-fixture"', '"changed"'))
    with pytest.raises(PrepError, match="differs from"):
        train(splits, tiny_config(bert), tmp_path / "run", echo=lambda *_: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.threads
def test_eval_protocols_match_metrics_of_the_full_score_matrix(tmp_path, dataset):
    from teranprep.pipeline.evaluate import evaluate, load_model
    from teranprep.teran.data import load_split, open_features
    from teranprep.teran.metrics import fold_metrics, retrieval_metrics
    from teranprep.teran.scoring import encode_split, model_score_matrix

    splits, features, bert = dataset
    run = tmp_path / "run"
    train(splits, tiny_config(bert, epochs=1, val_every=6), run, echo=lambda *_: None)
    model, _ = load_model(run)
    store = open_features(splits)
    data = load_split(splits, "test", store)
    scores = model_score_matrix(model, encode_split(model, data, store), image_block=1000,
                                caption_block=1000)
    quiet = lambda *_: None  # noqa: E731
    whole = evaluate(run, splits, protocol="all", image_block=3, caption_block=5, echo=quiet)
    want = retrieval_metrics(scores, data.caption_image)
    for d in ("i2t", "t2i"):
        assert whole[d] == pytest.approx(want[d])
    assert whole["rsum"] == pytest.approx(want["rsum"])
    folds = evaluate(run, splits, protocol="1k", fold_size=2, echo=quiet)
    want = fold_metrics(scores, data.caption_image, 2)
    assert folds["rsum"] == pytest.approx(want["rsum"]) and folds["i2t"] == pytest.approx(want["i2t"])
    assert len(folds["folds"]) == 2
    with pytest.raises(PrepError, match="whole folds"):
        evaluate(run, splits, protocol="1k", fold_size=3, echo=quiet)
    with pytest.raises(PrepError, match="5K protocol"):
        evaluate(run, splits, protocol="5k", echo=quiet)


def test_cli_train_reports_lineage_mismatch_as_one_error_line(tmp_path, dataset):
    from click.testing import CliRunner
    from teranprep.cli import main
    splits, features, bert = dataset
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(bert, epochs=1, val_every=100)))
    ok = CliRunner().invoke(main, ["train", str(splits), "--config", str(config), "--out", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert "6 steps" in ok.output and (tmp_path / "run" / LAST).is_file()
    again = CliRunner().invoke(main, ["train", str(splits), "--out", str(tmp_path / "run"), "--resume"])
    assert again.exit_code == 0 and "6 steps" in again.output, again.output  # finished: nothing to do
    missing = CliRunner().invoke(main, ["train", str(splits), "--out", str(tmp_path / "run3")])
    assert missing.exit_code == 2 and "--config is required" in missing.output
    manifest = features / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    bad = CliRunner().invoke(main, ["train", str(splits), "--config", str(config), "--out", str(tmp_path / "run2")])
    assert bad.exit_code == 2
    assert bad.output.startswith("error: ") and "manifest.json" in bad.output and len(bad.output.splitlines()) == 1


def test_loader_workers_read_the_same_batches_as_the_main_process(tmp_path, dataset):
    import torch
    from teranprep.teran.data import EpochBatchSampler, PairDataset, load_split, make_loader, open_features
    splits, _, _ = dataset
    store = open_features(splits)
    store["img000.jpg"]  # open a shard handle before the fork: workers must reopen theirs
    data = PairDataset(load_split(splits, "train", store), store)
    def batches(workers):
        sampler = EpochBatchSampler(len(data), 4, seed=3)
        sampler.set_position(epoch=1, start_batch=2)
        return list(make_loader(data, batch_sampler=sampler, num_workers=workers))
    inline, forked = batches(0), batches(2)
    assert len(inline) == 4
    for a, b in zip(inline, forked):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Regions are padded behind the zero slot 0 and match the features read directly.
    first = inline[0]
    i = int(first["index"][0])
    regions = store[data.keys[i]]
    n = len(regions)
    assert int(first["region_lengths"][0]) == n + 1
    assert torch.equal(first["features"][0, 0], torch.zeros(8))
    assert torch.equal(first["features"][0, 1:n + 1], torch.from_numpy(regions.features))


def test_features_without_image_sizes_are_refused(tmp_path):
    """Imported features may lack image sizes (-1); box vectors would be garbage, so training refuses."""
    import numpy as np
    import pandas as pd
    from teranprep.errors import PrepError
    from teranprep.manifests import FeatureStore
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions
    from teranprep.teran.data import load_split
    regions = [Regions(k, w, 50, np.zeros((2, 4), np.float32), np.ones((2, 3), np.float32))
               for k, w in (("a.jpg", 40), ("b.jpg", -1))]
    write_features(tmp_path / "f", regions, feature_dim=3, columns=())
    split = tmp_path / "s"
    split.mkdir()
    pd.DataFrame({"image_key": ["a.jpg", "b.jpg"], "caption_id": [0, 1], "raw": ["x", "y"],
                  "input_ids": [[101, 102], [101, 102]]}).to_parquet(split / "train.parquet")
    store = FeatureStore(tmp_path / "f")
    with pytest.raises(PrepError, match="b.jpg"):
        load_split(split, "train", store)
    (split / "train.parquet").unlink()
    pd.DataFrame({"image_key": ["a.jpg"], "caption_id": [0], "raw": ["x"],
                  "input_ids": [[101, 102]]}).to_parquet(split / "train.parquet")
    assert load_split(split, "train", store).image_keys == ["a.jpg"]
