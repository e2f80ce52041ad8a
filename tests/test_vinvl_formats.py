"""VinVL outputs: --spatial's 2054-style layout recorded in the manifest, vinvl-tsv (Oscar / ALADIN)
export read back by an independent reader, its import round trip, and the MMF LMDB export."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from teranprep.manifests.features import FeatureStore


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    from teranprep.pipeline.extract import extract_regions
    root = tmp_path_factory.mktemp("vinvl-formats")
    rng = np.random.default_rng(0)
    (root / "im" / "sub").mkdir(parents=True)
    for name, (h, w) in {"a.png": (90, 120), "sub/b.jpg": (100, 80)}.items():
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[20:60, 20:60] = (200, 30, 30)
        Image.fromarray(img).save(root / "im" / name, quality=95)
    out = root / "features"
    extract_regions(root / "im", out, model="vinvl-tiny", random_weights=1, workers=0, dtype="float32",
                    model_options={"spatial": True}, echo=lambda *_: None)
    return out


def test_spatial_layout_is_recorded_and_its_values_follow_the_boxes(features):
    manifest = json.loads((features / "manifest.json").read_text())
    assert manifest["parameters"]["feature_layout"].startswith("res5-mean-2048+box-geometry-6")
    assert manifest["parameters"]["options"] == {"spatial": True}
    with FeatureStore(features) as store:
        assert store.feature_dim == 256 + 6
        r = store["sub/b.jpg"]
        x1, y1, x2, y2 = r.boxes.T
        want = np.stack([x1 / 80, y1 / 100, x2 / 80, y2 / 100, (x2 - x1) / 80, (y2 - y1) / 100], 1)
        np.testing.assert_allclose(r.features[:, -6:], want, rtol=1e-6, atol=1e-7)


def read_tsv_row(tsv, lineidx, i):
    """Oscar's TSVFile.seek, written out: the i-th offset of the .lineidx, one line, tab split."""
    offsets = [int(line) for line in lineidx.read_text().splitlines()]
    with open(tsv, "rb") as fh:
        fh.seek(offsets[i])
        return fh.readline().decode("utf-8").rstrip("\n").split("\t")


def test_vinvl_tsv_export_parses_back_to_the_same_arrays(features, tmp_path):
    out = tmp_path / "tsv"
    proc = subprocess.run([sys.executable, "-m", "teranprep", "export-features", str(features), "--to", "vinvl-tsv",
                           str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    id2idx = json.loads((out / "imageid2idx.json").read_text())
    assert id2idx == {"a.png": 0, "sub/b.jpg": 1}
    with FeatureStore(features) as store:
        for key, i in id2idx.items():
            row = read_tsv_row(out / "features.tsv", out / "features.lineidx", i)
            assert row[0] == key and len(row) == 3
            n = int(row[1])
            feats = np.frombuffer(base64.b64decode(row[-1]), np.float32).reshape(n, -1)  # Oscar's decode
            r = store[key]
            np.testing.assert_array_equal(feats, r.features)
            pred = read_tsv_row(out / "predictions.tsv", out / "predictions.lineidx", i)
            assert pred[0] == key
            info = json.loads(pred[1])
            assert (info["image_w"], info["image_h"]) == (r.width, r.height)
            np.testing.assert_array_equal(np.array([o["rect"] for o in info["objects"]], np.float32), r.boxes)
            assert [o["class"] for o in info["objects"]] == [str(c) for c in r.class_ids]


def test_vinvl_tsv_import_round_trip_and_a_stale_lineidx_is_refused(features, tmp_path):
    from teranprep.errors import PrepError
    from teranprep.pipeline.formats import export_features, import_features
    export_features(features, "vinvl-tsv", tmp_path / "tsv", quiet=True)
    import_features("vinvl-tsv", tmp_path / "tsv", tmp_path / "back", quiet=True)
    with FeatureStore(features) as a, FeatureStore(tmp_path / "back") as b:
        assert a.keys() == b.keys()
        for key in a.keys():
            ra, rb = a[key], b[key]
            assert (ra.width, ra.height) == (rb.width, rb.height)
            np.testing.assert_array_equal(ra.features, rb.features)
            np.testing.assert_array_equal(ra.boxes, rb.boxes)
            np.testing.assert_array_equal(ra.class_scores, rb.class_scores)
    idx = tmp_path / "tsv" / "features.lineidx"
    idx.write_text("0\n7\n")
    with pytest.raises(PrepError, match="offsets do not match"):
        import_features("vinvl-tsv", tmp_path / "tsv", tmp_path / "back2", quiet=True)


def test_lmdb_export_has_mmfs_keys_and_fields(features, tmp_path):
    import lmdb
    from teranprep.pipeline.formats import export_features
    from teranprep.safe_pickle import safe_loads
    export_features(features, "lmdb", tmp_path / "l", quiet=True)
    env = lmdb.open(str(tmp_path / "l" / "features.lmdb"), readonly=True, lock=False)
    with env.begin() as txn, FeatureStore(features) as store:
        keys = safe_loads(txn.get(b"keys"))  # our own file; only plain data and arrays inside
        assert keys == [b"a.png", b"sub/b.jpg"]
        for key in keys:
            item = safe_loads(txn.get(key))
            r = store[key.decode()]
            assert item["feature_path"] == key.decode() and item["num_boxes"] == len(r)
            assert (item["image_width"], item["image_height"]) == (r.width, r.height)
            np.testing.assert_array_equal(item["features"], r.features)
            np.testing.assert_array_equal(item["bbox"], r.boxes)
            np.testing.assert_array_equal(item["objects"], r.class_ids)
    env.close()
