"""train-detector end to end on a tiny synthetic set: per-epoch mAP, resume, and a checkpoint the extractor loads."""

from __future__ import annotations

import json

import pytest
import torch

from teranprep.errors import PrepError
from teranprep.pipeline.synthetic import make_synthetic
from teranprep.pipeline.train_detector import train_detector

# small and fast: 64 px images upscaled to 128, few proposals and sampled boxes
TINY = {"epochs": 2, "images_per_batch": 2, "warmup_iters": 2, "eval": {"max_per_image": 20},
        "model_overrides": {"test_short": 128, "test_max": 192, "anchor_scales": [2.0, 4.0],
                            "pre_nms_topk": 200, "post_nms_topk": 16, "pooler_resolution": 7},
        "rpn": {"batch": 32}, "roi": {"batch": 8}, "threads": 1}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return make_synthetic(out, images=10, seed=5, size=64, val=2, test=1, image_format="png")


class Stop(Exception):
    pass


@pytest.mark.threads
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(shapes, tmp_path):
    lines = []
    straight = train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "a",
                              overrides=TINY, echo=lines.append)
    assert sum("val mAP@0.5" in line for line in lines) == 2  # printed after every epoch
    assert len(straight.history) == 2 and all(0 <= h["val_map50"] <= 1 for h in straight.history)

    def stop_after_first_epoch(line):
        if "epoch 1/2" in line:
            raise Stop
    with pytest.raises(Stop):
        train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "b", overrides=TINY,
                       echo=stop_after_first_epoch)
    assert not (tmp_path / "b" / "model_final.pth").exists()
    said = []
    resumed = train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "b",
                             overrides=TINY, echo=said.append)
    assert any("resuming after epoch 1" in line for line in said)
    a = torch.load(tmp_path / "a" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    def untimed(history):
        return [{k: v for k, v in h.items() if not k.endswith("_s")} for h in history]
    # the same losses and validation figures epoch by epoch (only the timings differ)
    assert untimed(resumed.history) == untimed(straight.history)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    again = train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "b", overrides=TINY,
                           echo=said.append)
    assert again.noop
    with pytest.raises(PrepError, match="other settings"):
        train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "b",
                       overrides={**TINY, "lr": 0.5}, echo=said.append)


def test_trained_checkpoint_extracts_with_the_datasets_head_sizes(shapes, tmp_path):
    from teranprep.extractors import DetectorSpec, build_detector
    from teranprep.manifests import FeatureStore
    from teranprep.pipeline.extract import extract_regions
    result = train_detector(shapes.instances, shapes.images_dir, out=tmp_path / "det",
                            overrides={**TINY, "epochs": 1}, echo=lambda _: None)
    ckpt = torch.load(result.weights, weights_only=True)
    assert ckpt["classes"] == ["circle", "square", "triangle", "star", "cross", "diamond"]
    assert ckpt["config"]["num_classes"] == 7 and ckpt["config"]["num_attrs"] == 7
    det = build_detector(DetectorSpec(model="butd-tiny", weights=str(result.weights)))
    assert (det.cfg.num_classes, det.cfg.num_attrs, det.cfg.test_short, det.cfg.pooler_resolution,
            det.cfg.post_nms_topk) == (7, 7, 128, 7, 16)
    features = tmp_path / "features"
    extract_regions(shapes.images_dir, features, model="butd-tiny", weights=str(result.weights),
                    workers=0, min_boxes=2, max_boxes=4, device="cpu", quiet=True, echo=lambda _: None)
    with FeatureStore(features) as store:
        assert len(store.keys()) == 10
        regions = store[store.keys()[0]]
        assert 2 <= len(regions) <= 4
        assert regions.class_ids.max() < 6 and regions.attr_ids.max() < 6
    names = (tmp_path / "det" / "classes.txt").read_text().split()
    assert names == ckpt["classes"]


def test_bad_annotation_file_is_one_line_error(tmp_path, shapes):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(PrepError, match="COCO"):
        train_detector(bad, shapes.images_dir, out=tmp_path / "x", overrides=TINY)
    doc = json.loads(shapes.instances.read_text())
    doc["annotations"][0]["category_id"] = 99
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(doc))
    with pytest.raises(PrepError, match="category_id"):
        train_detector(wrong, shapes.images_dir, out=tmp_path / "y", overrides=TINY)
