"""One --device rule for every stage, and no silently dropped --workers: checked through the
real `prep` command in a subprocess (exit code, one `error:` line, no traceback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_images
from teranprep.devices import device_kind, resolve_device
from teranprep.errors import PrepError

SRC = Path(__file__).resolve().parents[1] / "src"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def prep(*args, cwd):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "teranprep", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_error_line(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_the_rule_itself():
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=True, local_rank=1) == "cuda:1"
    assert resolve_device("cuda:1", cuda_available=True) == "cuda:1"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(PrepError, match="no CUDA device on the workers of tcp://x:1"):
        resolve_device("cuda", cuda_available=False, where=" on the workers of tcp://x:1")
    with pytest.raises(PrepError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device("gpu", cuda_available=True)
    assert device_kind("cuda:3") == "cuda" and device_kind("cpu") == "cpu"


@no_cuda
@pytest.mark.parametrize("stage", ["extract-regions", "train", "eval", "index"])
def test_cuda_without_cuda_is_one_line_exit_2_in_every_stage(stage, tmp_path):
    # the inputs do not even exist: the device is refused before anything is read
    args = {"extract-regions": ["extract-regions", "images", "features", "--random-weights", "0"],
            "train": ["train", "splits", "--config", "teran_small", "--out", "run"],
            "eval": ["eval", "run", "--splits", "splits"],
            "index": ["index", "run", "--features", "features", "--out", "index"]}[stage]
    res = prep(*args, "--device", "cuda", cwd=tmp_path)
    assert_one_error_line(res, "--device cuda was asked for but torch sees no CUDA device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("stage", ["extract-regions", "eval", "index"])
def test_workers_with_scheduler_is_refused_in_one_line(stage, tmp_path):
    args = {"extract-regions": ["extract-regions", "images", "features", "--random-weights", "0"],
            "eval": ["eval", "run", "--splits", "splits"],
            "index": ["index", "run", "--features", "features", "--out", "index"]}[stage]
    for workers in ("0", "3"):  # 0 too: before, it was dropped as silently as any other count
        res = prep(*args, "--workers", workers, "--scheduler", "tcp://127.0.0.1:9", cwd=tmp_path)
        assert_one_error_line(res, f"--workers {workers} and --scheduler tcp://127.0.0.1:9 do not combine")


def test_with_a_scheduler_the_manifest_records_what_the_workers_ran_at(image_dir, tmp_path):
    """The worker processes of this cluster run torch at 1 thread by their environment; the
    manifest's thread count and device come from their shard stats, the fingerprint's device
    from what they reported before planning."""
    from dask.distributed import LocalCluster
    from teranprep.pipeline.common.distribute import worker_environment
    from teranprep.pipeline.extract import extract_regions
    write_images(image_dir, 2)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        env = worker_environment(cluster.scheduler_address)
        assert env == {"cuda": torch.cuda.is_available(), "threads": env["threads"], "workers": 1}
        out = tmp_path / "f"
        extract_regions(image_dir, out, scheduler=cluster.scheduler_address, threads_per_worker=2,
                        model="tv-frcnn-mbv3-320", random_weights=0, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    stats = json.loads((out / "shards" / "regions-00000.json").read_text())
    assert manifest["devices"]["threads_per_task"] == [stats["threads"]] == [2]
    assert manifest["devices"]["used"] == [stats["device"]] == ["cuda" if env["cuda"] else "cpu"]
    assert manifest["parameters"]["device"] == ("cuda" if env["cuda"] else "cpu")
