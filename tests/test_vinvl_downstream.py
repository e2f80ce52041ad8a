"""VinVL features downstream: build-splits, train and eval run on vinvl-tiny features (the 2054-style
--spatial layout, whose width no head count divides), and the bundled teran_coco_vinvl config."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from teran_fixtures import make_tiny_bert, tiny_config


def test_teran_coco_vinvl_takes_its_input_width_from_the_features():
    from teranprep.teran.config import load_config
    config = load_config("teran_coco_vinvl")
    assert config["image"]["feature_dim"] is None  # 2048 or 2054, whichever the manifest says
    assert config["image"]["hidden_dim"] % config["image"]["heads"] == 0
    assert config["image"]["hidden_dim"] == 2048


def test_build_splits_train_and_eval_run_on_vinvl_features(tmp_path):
    from teranprep.pipeline.evaluate import evaluate
    from teranprep.pipeline.extract import extract_regions
    from teranprep.pipeline.splits import build_splits
    from teranprep.pipeline.train import train
    rng = np.random.default_rng(0)
    (tmp_path / "im").mkdir()
    images = []
    for i in range(10):
        img = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
        img[10:40, 10:50] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(tmp_path / "im" / f"img{i}.png")
        split = "train" if i < 6 else ("val" if i < 8 else "test")
        images.append({"filename": f"img{i}.png", "split": split, "imgid": i,
                       "sentences": [{"raw": f"a red box number {i}"}, {"raw": f"a square {i} on grey"}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    features = tmp_path / "features"
    extract_regions(tmp_path / "im", features, model="vinvl-tiny", random_weights=2, workers=0,
                    model_options={"spatial": True}, min_boxes=4, max_boxes=8, echo=lambda *_: None)
    splits = tmp_path / "splits"
    build_splits(tmp_path / "dataset_coco.json", features=features, out=splits)
    bert = make_tiny_bert(tmp_path / "bert", vocab_size=30522)  # the splits' WordPiece ids
    config = tiny_config(bert, epochs=1, val_every=2)
    config["image"]["hidden_dim"] = 16
    train(splits, config, tmp_path / "run", device="cpu", echo=lambda *_: None)
    import torch
    last = sorted((tmp_path / "run").glob("checkpoint*.pt"))[-1]
    assert torch.load(last, weights_only=False)["feature_dim"] == 256 + 6
    metrics = evaluate(tmp_path / "run", splits, split="test", device="cpu", ndcg=False, echo=lambda *_: None)
    assert (metrics["n_images"], metrics["n_captions"]) == (2, 4)
    for side in ("i2t", "t2i"):  # 2 test images: every rank is 1 or 2
        assert metrics[side]["r5"] == 100.0 and metrics[side]["r1"] in (0.0, 50.0, 100.0)
