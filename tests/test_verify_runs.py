"""prep verify on runs/NAME: checkpoints load safely and into their model, config and lineage match."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from teran_fixtures import make_tiny_bert, random_dataset, tiny_config, one_thread  # noqa: F401 (autouse)
from teranprep.cli import main
from teranprep.pipeline.train import BEST, LAST, train
from teranprep.pipeline.verify import verify


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run shared by the tests; each test copies it before damaging it."""
    import numpy as np

    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions
    tmp = tmp_path_factory.mktemp("run")

    def make_features(keys, n_boxes=5, dim=8, seed=0):  # conftest's fixture is function-scoped
        rng = np.random.default_rng(seed)
        regions = [Regions(k, 100, 120, np.tile(np.array([[1, 2, 30, 40]], np.float32), (n_boxes[k], 1)),
                           rng.standard_normal((n_boxes[k], dim)).astype(np.float32)) for k in sorted(keys)]
        write_features(tmp / "features", regions, feature_dim=dim, columns=(), stage="test")
        return tmp / "features", None

    splits, _ = random_dataset(tmp, make_features, n_train=8, n_val=4)
    config = tiny_config(make_tiny_bert(tmp / "bert"), epochs=1, val_every=2)
    train(splits, config, tmp / "runs" / "r1", echo=lambda *_: None)
    return tmp


def copy_run(trained, tmp_path):
    import shutil
    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "r1"


def test_intact_run_and_runs_folder_pass(trained):
    res = CliRunner().invoke(main, ["verify", str(trained / "runs" / "r1")])
    assert res.exit_code == 0, res.output
    assert "consistent (2 files checked)" in res.output
    assert verify(trained / "runs").ok


def test_edited_config_yaml_no_longer_matches_the_checkpoints(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["training"]["lr"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    problems = verify(run).problems
    assert problems == [f"{run / LAST}: its config differs from config.yaml (edited after training?); "
                        "eval reads the checkpoint's copy",
                        f"{run / BEST}: its config differs from config.yaml (edited after training?); "
                        "eval reads the checkpoint's copy"]


def test_truncated_checkpoint_is_reported(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    data = (run / BEST).read_bytes()
    (run / BEST).write_bytes(data[: len(data) // 2])
    problems = verify(run).problems
    assert len(problems) == 1 and problems[0].startswith(f"{run / BEST}: is a zip archive")
    assert "not a torch checkpoint that loads" in problems[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_code_in_its_pickle_is_refused_without_running_it(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    ckpt = torch.load(run / LAST, weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["validation"] = _Payload(marker)
    torch.save(ckpt, run / LAST)
    problems = verify(run).problems
    assert not marker.exists()
    assert len(problems) == 1 and "refused to load" in problems[0] and str(run / LAST) in problems[0]


def test_state_dict_that_does_not_fit_its_model_is_reported(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    ckpt = torch.load(run / LAST, weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = torch.zeros(3, 3)
    torch.save(ckpt, run / LAST)
    problems = verify(run).problems
    assert len(problems) == 1 and problems[0].startswith(
        f"{run / LAST}: the model state does not load into the model its config describes")


def test_splits_changed_since_training_are_reported(trained, tmp_path):
    import json
    import shutil
    shutil.copytree(trained, tmp_path / "copy")
    run = tmp_path / "copy" / "runs" / "r1"
    # Point the run at a copy of its splits, then change that copy's manifest.
    lineage = json.loads((run / "lineage.json").read_text())
    lineage["splits"] = str(tmp_path / "copy" / "splits")
    (run / "lineage.json").write_text(json.dumps(lineage))
    for name in (LAST, BEST):
        ckpt = torch.load(run / name, weights_only=True)
        ckpt["lineage"] = lineage
        torch.save(ckpt, run / name)
    assert verify(run).ok
    manifest = tmp_path / "copy" / "splits" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"seed": 0', '"seed": 1'))
    problems = verify(run).problems
    assert problems == [f"{manifest}: changed since the run {run} was trained on it; evaluate with "
                        "the splits it was trained on"]
