"""Shared fixtures: small inputs generated at test time (never downloaded, never committed)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Progress lines off a terminal every 30 s would land in the output tests compare on a loaded
# machine; the test of those lines sets its own interval.
os.environ.setdefault("TERANPREP_PROGRESS_SECONDS", "3600")
# Under pytest-xdist (`make test` runs 2 workers) each worker and the `prep` processes it starts
# get an equal share of the cores: two workers with 2 OpenMP threads each on 2 cores spin against
# each other (the quick demo took 3x as long). An OMP_NUM_THREADS already set is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture
def make_features(tmp_path):
    """make_features(keys, n_boxes=5, dim=8, seed=0, shard_size=2) -> (features_dir, {key: Regions})."""
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions

    def make(keys, n_boxes=5, dim=8, seed=0, shard_size=2, dtype="float32", name="features"):
        rng = np.random.default_rng(seed)
        regions = {}
        for key in sorted(keys):
            n = n_boxes if np.isscalar(n_boxes) else n_boxes[key]
            xy = rng.uniform(0, 50, (n, 2)).astype(np.float32)
            wh = rng.uniform(5, 50, (n, 2)).astype(np.float32)
            regions[key] = Regions(key, 100, 120, np.concatenate([xy, xy + wh], 1),
                                   rng.standard_normal((n, dim)).astype(np.float32),
                                   class_ids=rng.integers(0, 10, n).astype(np.int32),
                                   class_scores=rng.uniform(0, 1, n).astype(np.float32))
        out = tmp_path / name
        write_features(out, regions.values(), feature_dim=dim, dtype=dtype, shard_size=shard_size,
                       columns=("class_ids", "class_scores"), stage="test-fixture")
        return out, regions

    return make


def write_images(root, n, seed=0, size=(96, 128), formats=("jpg", "png")):
    """n small RGB images with shapes on noise, under root (some in a subfolder); returns their keys."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    keys = []
    for i in range(n):
        h, w = size
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        draw.rectangle([x, y, x + w // 3, y + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        key = f"{'sub/' if i % 3 == 2 else ''}img{i:03d}.{formats[i % len(formats)]}"
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        keys.append(key)
    return sorted(keys)


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    return root


def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` sends tests of one `xdist_group` to one worker by the "@group" suffix
    pytest-xdist 3.8 gives their node ids through item._nodeid, which pytest 9 no longer reads
    (Node.nodeid is str(item._id)): the two quick-demo tests ran in two workers and built the
    demo twice. Adds the suffix where xdist's did not take, in workers under loadgroup only."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "loadgroup", False)):
        return
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        if mark is None or "@" in item.nodeid:
            continue
        group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        nodeid = f"{item.nodeid}@{group}"
        try:
            from _pytest.nodes import coerce_node_id
            item._id = coerce_node_id(nodeid)
        except ImportError:  # a pytest that still reads _nodeid
            item._nodeid = nodeid


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """(result, echoed lines, settings) of `run_demo` with DemoSettings.quick() into a temp folder,
    run once per session (tests/test_demo.py and test_search.py's search-vs-eval test share it)."""
    from teranprep.pipeline.demo import DemoSettings, run_demo
    lines = []
    settings = DemoSettings.quick()
    result = run_demo(tmp_path_factory.mktemp("quick-demo") / "demo", settings, echo=lines.append)
    return result, lines, settings
