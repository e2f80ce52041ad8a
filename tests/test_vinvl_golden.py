"""Parity with scene_graph_benchmark's own AttrRCNN on the same checkpoint (shared/reference/vinvl-golden).

The checkpoint is regenerated from recipe-keys.tsv once per session (every tensor checked against
its sha256), then the real `prep extract-regions --model vinvl-vg-x152c4 --weights CKPT --dtype
float32` runs in a subprocess on the reference's 3 images, and its features folder must match
what the reference computed: same count and order, boxes within 0.05 px, features within 1e-4
relative, labels equal, scores within 1e-4, the top attribute equal where it scores above 0.05;
and all 16 attributes per box, from the checkpoint's attribute head on the stored features.
"""

from __future__ import annotations

import hashlib
import math
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

# the reference's outputs (README.md there) and the 3 images it ran on (butd-golden's)
GOLDEN = Path(__file__).resolve().parent / "data" / "vinvl_golden"
IMAGES = GOLDEN.parent / "butd_golden" / "images"  # the same 3 images as the BUTD golden test
NAMES = ("scene-small", "scene-tall", "scene-wide")

# one worker extracts the three images once (~75 s) and runs every test of this file on them;
# spread over two workers, each built the session fixture itself
pytestmark = [pytest.mark.fullsize, pytest.mark.xdist_group("vinvl_golden")]


def recipe_tensor(key: str, shape: tuple, rule: str) -> np.ndarray:
    """One tensor of the recipe (vinvl-golden/README.md), in float32."""
    if rule.startswith("the model's own generate_anchors"):
        # maskrcnn_benchmark's generate_anchors(16, (32..512), (0.5, 1, 2)): Caffe's with scales = sizes / 16
        from teranprep.extractors.butd.ops import caffe_cell_anchors
        return caffe_cell_anchors(16, (0.5, 1.0, 2.0), (2.0, 4.0, 8.0, 16.0, 32.0)).numpy()
    n = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape, dtype=np.float32)
    fixed = {"1 + 0.02 n": lambda: np.float32(1) + np.float32(0.02) * n,
             "0.02 n": lambda: np.float32(0.02) * n,
             "1 + 0.02 |n|": lambda: np.float32(1) + np.float32(0.02) * np.abs(n),
             "0.01 n": lambda: np.float32(0.01) * n,
             "n": lambda: n}
    if rule in fixed:
        return fixed[rule]().astype(np.float32)
    m = re.fullmatch(r"n \* float32\(([0-9.]+) / sqrt\(([0-9]+)\)\)", rule)
    assert m, f"unknown recipe rule {rule!r}"
    return (n * np.float32(float(m.group(1)) / math.sqrt(float(m.group(2))))).astype(np.float32)


def regenerate_checkpoint(path: Path) -> Path:
    import torch
    state = {}
    with open(GOLDEN / "recipe-keys.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            key, shape, rule, digest = line.rstrip("\n").split("\t")
            shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
            t = np.ascontiguousarray(recipe_tensor(key, shape, rule), dtype="<f4")
            assert t.shape == shape, key
            assert hashlib.sha256(t.tobytes()).hexdigest() == digest, f"recipe tensor {key} ({rule}) differs"
            state[key] = torch.from_numpy(t)
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="session")
def golden_features(tmp_path_factory):
    root = tmp_path_factory.mktemp("vinvl-golden")
    ckpt = regenerate_checkpoint(root / "vinvl_vg_x152c4.pth")
    out = root / "features"
    proc = subprocess.run([sys.executable, "-m", "teranprep", "extract-regions", str(IMAGES), str(out),
                           "--model", "vinvl-vg-x152c4", "--weights", str(ckpt), "--dtype", "float32",
                           "--workers", "0", "--batch-size", "1", "--quiet"],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr
    import torch
    head = {k: v for k, v in torch.load(ckpt)["model"].items() if k.startswith("attribute.predictor.")}
    ckpt.unlink()  # ~709 MB
    return out, head


@pytest.mark.parametrize("name", NAMES)
def test_vinvl_matches_the_reference_attr_rcnn(golden_features, name):
    from teranprep.manifests.features import FeatureStore
    ref = np.load(GOLDEN / "golden" / f"{name}.npz")
    with FeatureStore(golden_features[0]) as store:
        got = store[f"{name}.png"]
    assert (got.height, got.width) == tuple(ref["im_hw"])
    assert len(got.boxes) == len(ref["boxes"])
    np.testing.assert_allclose(got.boxes, ref["boxes"], atol=0.05, rtol=0)
    np.testing.assert_array_equal(got.class_ids + 1, ref["labels"])  # stored 0-based, foreground only
    np.testing.assert_allclose(got.class_scores, ref["scores"], atol=1e-4, rtol=0)
    feats = ref["box_features"]
    rel = np.abs(got.features - feats).max() / np.abs(feats).max()
    assert rel <= 1e-4, f"features differ by {rel:.2e} of their largest value"
    has_attr = ref["attr_scores"][:, 0] > 0.05
    np.testing.assert_array_equal(got.attr_ids[has_attr] + 1, ref["attr_labels"][has_attr, 0])
    np.testing.assert_allclose(got.attr_scores[has_attr], ref["attr_scores"][has_attr, 0], atol=1e-4, rtol=0)
    assert (got.attr_ids[~has_attr] == -1).all()


@pytest.mark.parametrize("name", NAMES)
def test_all_sixteen_attributes_per_box_match_on_the_stored_features(golden_features, name):
    """The features folder keeps each box's top attribute; the reference outputs 16. The same
    attribute head (the checkpoint's attribute.predictor) and post-processing on the stored
    features and labels must give all 16 where the reference's scores exceed 0.05."""
    import torch
    from teranprep.extractors.vinvl.ops import select_attributes
    from teranprep.manifests.features import FeatureStore
    ref = np.load(GOLDEN / "golden" / f"{name}.npz")
    with FeatureStore(golden_features[0]) as store:
        got = store[f"{name}.png"]
    w = golden_features[1]
    feats = torch.from_numpy(np.asarray(got.features, np.float32))
    labels = torch.from_numpy(got.class_ids.astype(np.int64) + 1)
    x = torch.cat([feats, w["attribute.predictor.cls_embedding.weight"][labels]], 1)
    hidden = torch.relu(x @ w["attribute.predictor.fc_attr.weight"].T + w["attribute.predictor.fc_attr.bias"])
    logits = hidden @ w["attribute.predictor.attr_score.weight"].T + w["attribute.predictor.attr_score.bias"]
    attr_labels, attr_scores = select_attributes(logits, 0.05, 100, 16)
    shown = ref["attr_scores"] > 0.05
    assert shown.sum() > len(shown)  # more than one attribute per box on average: the test has teeth
    np.testing.assert_array_equal(attr_labels.numpy()[shown], ref["attr_labels"][shown])
    np.testing.assert_allclose(attr_scores.numpy()[shown], ref["attr_scores"][shown], atol=1e-4, rtol=0)
