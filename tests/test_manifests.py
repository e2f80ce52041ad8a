import numpy as np
import pytest

from teranprep.errors import PrepError
from teranprep.manifests import FeatureStore
from teranprep.manifests.shards import Regions, ShardReader, ShardWriter


def test_reader_returns_exactly_what_was_written(make_features):
    keys = ["a.jpg", "b/c.png", "b/d.jpg", "e.jpg", "z.jpg"]
    out, regions = make_features(keys, n_boxes={"a.jpg": 3, "b/c.png": 0, "b/d.jpg": 7,
                                                "e.jpg": 1, "z.jpg": 4})
    with FeatureStore(out) as store:
        assert store.keys() == sorted(keys)
        for key in reversed(keys):  # random access, any order
            got, want = store[key], regions[key]
            assert got.image_key == key and (got.width, got.height) == (want.width, want.height)
            np.testing.assert_array_equal(got.features, want.features)
            np.testing.assert_array_equal(got.boxes, want.boxes)
            np.testing.assert_array_equal(got.class_ids, want.class_ids)
            np.testing.assert_array_equal(got.class_scores, want.class_scores)
        with pytest.raises(KeyError):
            store["missing.jpg"]


def test_float16_overflow_is_reported_not_written(tmp_path):
    feats = np.array([[1.0, 7e4]], np.float32)
    assert "float16" in ShardWriter.check_representable(feats, "float16")
    assert ShardWriter.check_representable(feats, "float32") is None
    assert "non-finite" in ShardWriter.check_representable(np.array([[np.inf]]), "float32")


def test_unclosed_shard_does_not_exist(tmp_path):
    path = tmp_path / "regions-00000.h5"
    writer = ShardWriter(path, feature_dim=2, dtype="float32", attrs={}, optional_columns=())
    writer.append(Regions("a", 1, 1, np.zeros((1, 4), np.float32), np.ones((1, 2), np.float32)))
    assert not path.exists()
    writer.close()
    with ShardReader(path) as reader:
        np.testing.assert_array_equal(reader.read(0).features, [[1, 1]])


def test_missing_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(PrepError, match="no features manifest"):
        FeatureStore(tmp_path)
