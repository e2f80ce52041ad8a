"""The optional detectron2 backend: runs only where detectron2 is importable (not on PyPI)."""

from __future__ import annotations

import pytest

from teranprep.errors import PrepError
from teranprep.extractors import DetectorSpec, MODELS


def test_detectron2_backend_without_detectron2_is_a_one_line_prep_error():
    import importlib.util
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is importable here")
    with pytest.raises(PrepError, match="detectron2"):
        MODELS["detectron2"](DetectorSpec(model="detectron2", weights="w.pkl", options=(("d2_config", "c.yaml"),)))


@pytest.mark.detectron2
def test_detectron2_c4_backend_detects_and_pools_given_boxes(tmp_path):
    d2 = pytest.importorskip("detectron2")
    import numpy as np
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    config = model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    weights = tmp_path / "random.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    det = MODELS["detectron2"](DetectorSpec(model="detectron2", weights=str(weights),
                                            options=(("d2_config", config),), min_boxes=3, max_boxes=5))
    image = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    out = det.detect([image])[0]
    assert 3 <= len(out.boxes) <= 5 and out.features.shape[1] == det.feature_dim
    given = det.detect([image], [out.boxes])[0]
    np.testing.assert_allclose(given.features, out.features, rtol=1e-4, atol=1e-4)
    del d2
