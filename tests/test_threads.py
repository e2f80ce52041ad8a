"""Thread counts never leak out of a stage, and a cached detector is rebuilt when its numbers would differ."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import write_images
from teranprep.cli import main
from teranprep.extractors import DetectorSpec, build_detector
from teranprep.threads import torch_threads


def test_torch_threads_restores_the_count_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError("inside")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        torch.set_num_threads(before + 2)  # whatever the block sets is undone too
    assert torch.get_num_threads() == before


def unfolded_state(seed):
    from teranprep.extractors.butd.config import get_config
    from teranprep.extractors.butd.detector import init_random
    from teranprep.extractors.butd.model import ButdModel
    model = ButdModel(get_config("butd-tiny"))
    init_random(model, seed)
    return model.state_dict()


def test_detector_cache_is_keyed_by_thread_count_and_weights_file(tmp_path):
    spec = DetectorSpec(model="butd-tiny", random_seed=0)
    with torch_threads(1):
        one = build_detector(spec)
        assert build_detector(spec) is one
    with torch_threads(2):
        two = build_detector(spec)  # calibrated at another thread count: another detector
    assert two is not one
    path = tmp_path / "w.pth"
    torch.save({"model": unfolded_state(2)}, path)  # a detector's own model has its norms folded
    with torch_threads(1):
        first = build_detector(DetectorSpec(model="butd-tiny", weights=str(path)))
        assert build_detector(DetectorSpec(model="butd-tiny", weights=str(path))) is first
        torch.save({"model": unfolded_state(1)}, path)  # the same path, rewritten
        assert build_detector(DetectorSpec(model="butd-tiny", weights=str(path))) is not first


def test_train_detector_leaves_the_callers_thread_count(tmp_path):
    from teranprep.pipeline.synthetic import make_synthetic
    from teranprep.pipeline.train_detector import train_detector
    from test_train_detector import TINY
    shapes = make_synthetic(tmp_path / "shapes", images=4, seed=5, size=64, val=1, test=0, image_format="png")
    with torch_threads(2):
        train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "det",
                       overrides={**TINY, "epochs": 1, "threads": 1}, echo=lambda _: None)
        assert torch.get_num_threads() == 2


def test_features_manifest_records_the_cpu_capability_and_threads(tmp_path):
    write_images(tmp_path / "images", 2, size=(48, 64))
    args = ["extract-regions", str(tmp_path / "images"), str(tmp_path / "f"), "--model", "tv-frcnn-mbv3-320",
            "--random-weights", "0", "--workers", "0", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert manifest["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    from teranprep.pipeline.common.distribute import default_threads
    assert manifest["devices"]["threads_per_task"] == [default_threads(0, 1, None)]  # one shard, all cores
    from teranprep.extractors.precision import bf16_hardware, cpu_description
    assert manifest["devices"]["cpus"] == [cpu_description()]  # the worker's CPU model and bf16 hardware
    assert cpu_description().endswith(f"(bf16: {bf16_hardware()})")
    before = (tmp_path / "f" / "manifest.json").read_bytes()
    again = CliRunner().invoke(main, args)  # a re-run completes and rewrites nothing
    assert again.exit_code == 0 and (tmp_path / "f" / "manifest.json").read_bytes() == before
