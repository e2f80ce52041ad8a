"""Features from random weights stay labelled: every later stage warns on stderr (--quiet too)
and records it in what it writes; features from real weights raise no such warning."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from click.testing import CliRunner

from conftest import write_images
from teran_fixtures import make_tiny_bert, tiny_config, write_tiny_tokenizer
from teranprep.cli import main

WARNING = "features from random weights"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def warning_lines(result, stage):
    return [line for line in result.stderr.splitlines()
            if line.startswith(f"warning: {stage}: ") and WARNING in line]


@pytest.fixture(scope="module")
def random_features(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("random")
    keys = write_images(tmp / "images", 8, size=(64, 80))
    result = run("extract-regions", tmp / "images", tmp / "features", "--model", "tv-frcnn-mbv3-320",
                 "--random-weights", 0, "--workers", 0, "--min-boxes", 2, "--max-boxes", 4, "--quiet")
    assert result.exit_code == 0, result.output
    with open(tmp / "captions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i, key in enumerate(keys):
            for j in range(2):
                writer.writerow([key, " ".join(f"w{5 + (i * 3 + j + k) % 30}" for k in range(4)) + " ."])
    tokenizer = write_tiny_tokenizer(tmp / "tokenizer")
    bert = make_tiny_bert(tmp / "bert")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(bert, epochs=1, val_every=1000)))
    return tmp, tmp / "features", tokenizer, config


def test_every_stage_after_random_weight_features_warns_and_records_it(random_features):
    tmp, features, tokenizer, config = random_features
    assert json.loads((features / "manifest.json").read_text())["detector"]["random_weights"] is True
    features_before = snapshot(features)
    splits, run_dir, export = tmp / "splits", tmp / "run", tmp / "export"

    args = ("build-splits", tmp / "captions.csv", "--features", features, "--out", splits,
            "--val", 2, "--test", 2, "--tokenizer", tokenizer, "--max-tokens", 16, "--quiet")
    built = run(*args)
    assert built.exit_code == 0, built.output
    assert len(warning_lines(built, "build-splits")) == 1 and str(features) in built.stderr
    manifest = json.loads((splits / "manifest.json").read_text())
    assert manifest["random_weights"] is True and WARNING in manifest["warnings"][0]
    splits_before = snapshot(splits)

    trained = run("train", splits, "--config", config, "--out", run_dir, "--device", "cpu")
    assert trained.exit_code == 0, trained.output
    assert len(warning_lines(trained, "train")) == 1
    lineage = json.loads((run_dir / "lineage.json").read_text())
    assert lineage["random_weights"] is True and WARNING in lineage["warnings"][0]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if r["kind"] == "val"]
    assert validations and all(r["random_weights"] is True for r in validations)
    from teranprep.pipeline.train import LAST, load_checkpoint
    assert load_checkpoint(run_dir / LAST)["lineage"]["random_weights"] is True
    run_before = snapshot(run_dir)

    evaluated = run("eval", run_dir, "--splits", splits, "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    assert len(warning_lines(evaluated, "eval")) == 1
    metrics = json.loads((run_dir / "eval-test-all" / "metrics.json").read_text())
    assert metrics["random_weights"] is True and WARNING in metrics["warnings"][0]

    exported = run("export-features", features, "--to", "teran", export, "--quiet")
    assert exported.exit_code == 0, exported.output
    assert len(warning_lines(exported, "export-features")) == 1
    record = json.loads((export / "export.json").read_text())
    assert record["random_weights"] is True and WARNING in record["warnings"][0]

    # re-runs complete, warn again and change nothing that was there before
    again = run(*args)
    assert again.exit_code == 0 and len(warning_lines(again, "build-splits")) == 1
    resumed = run("train", splits, "--out", run_dir, "--resume", "--device", "cpu")
    assert resumed.exit_code == 0 and len(warning_lines(resumed, "train")) == 1, resumed.output
    assert run("eval", run_dir, "--splits", splits, "--device", "cpu").exit_code == 0
    assert snapshot(features) == features_before
    assert snapshot(splits) == splits_before
    assert all(snapshot(run_dir)[p] == data for p, data in run_before.items())


def test_a_run_trained_on_random_weights_warns_when_evaluated_on_other_features(random_features, tmp_path,
                                                                                make_features):
    """The run's own lineage carries the label: eval warns even if the features it reads now do not."""
    tmp, features, tokenizer, config = random_features
    splits = tmp_path / "splits"
    assert run("build-splits", tmp / "captions.csv", "--features", features, "--out", splits, "--val", 2,
               "--test", 2, "--tokenizer", tokenizer, "--max-tokens", 16, "--quiet").exit_code == 0
    assert run("train", splits, "--config", config, "--out", tmp_path / "run", "--device", "cpu").exit_code == 0
    # features of the same images from "real" weights (no random_weights in their manifest)
    from teranprep.manifests import FeatureStore
    with FeatureStore(features) as store:
        keys = store.keys()
        dim = store.feature_dim
    real, _ = make_features(keys, dim=dim, name="real")
    clean_splits = tmp_path / "clean-splits"
    clean = run("build-splits", tmp / "captions.csv", "--features", real, "--out", clean_splits, "--val", 2,
                "--test", 2, "--tokenizer", tokenizer, "--max-tokens", 16)
    assert clean.exit_code == 0 and "warning:" not in clean.stderr, clean.output
    assert "random_weights" not in json.loads((clean_splits / "manifest.json").read_text())
    evaluated = run("eval", tmp_path / "run", "--splits", clean_splits, "--device", "cpu",
                    "--out", tmp_path / "eval")
    assert evaluated.exit_code == 0, evaluated.output
    lines = warning_lines(evaluated, "eval")
    assert len(lines) == 1 and str(features) in lines[0]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["random_weights"] is True
