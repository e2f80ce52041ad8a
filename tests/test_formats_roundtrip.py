"""export-features writes what the original readers load, and import -> export -> import gives the
same arrays for every format."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
from click.testing import CliRunner

from formats_fixtures import (butd_row, lxmert_row, make_records, write_bua_npz, write_scan,
                              write_splits, write_teran, write_tsv)
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.manifests.features import FeatureStore
from teranprep.pipeline.formats import export_features, import_features
from teranprep.pipeline.verify import verify

IDS = ["391895", "522418", "184613", "318219"]


def store_arrays(features_dir):
    with FeatureStore(features_dir) as store:
        return {k: (store[k].features, store[k].boxes, store[k].width, store[k].height)
                for k in store.keys()}


def assert_same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key][0], b[key][0])
        np.testing.assert_array_equal(a[key][1], b[key][1])
        assert a[key][2:] == b[key][2:], key


def make_source(fmt, tmp_path):
    if fmt == "scan-precomp":
        records = make_records(IDS, boxes=(4, 4))
        return write_scan(tmp_path / "src", "train", records), records
    records = make_records(IDS)
    if fmt == "butd-tsv":
        return write_tsv(tmp_path / "src.tsv", [butd_row(s, r) for s, r in records.items()]), records
    if fmt == "lxmert-tsv":
        return write_tsv(tmp_path / "src.tsv", [lxmert_row(s, r) for s, r in records.items()]), records
    if fmt == "bua-npz":
        return write_bua_npz(tmp_path / "src", records), records
    return write_teran(tmp_path / "src", records, sizes=True), records


# Each import format, and the export format whose files it goes back through.
ROUND_TRIPS = [("butd-tsv", "butd-tsv", "butd-tsv"), ("lxmert-tsv", "butd-tsv", "butd-tsv"),
               ("bua-npz", "teran", "teran"), ("teran", "teran", "teran"),
               ("scan-precomp", "scan-precomp", "scan-precomp"), ("bua-npz", "scan-precomp", None)]


@pytest.mark.parametrize("fmt,to,again", ROUND_TRIPS)
def test_import_export_import_gives_identical_arrays(tmp_path, fmt, to, again):
    src, records = make_source(fmt, tmp_path)
    sizes = (tmp_path / "src/sizes.csv") if fmt == "teran" else None
    import_features(fmt, src, tmp_path / "first", sizes=sizes, shard_size=3, quiet=True)
    first = store_arrays(tmp_path / "first")
    expected = {s: (r["features"], r["boxes"], r["width"], r["height"]) for s, r in records.items()}
    assert_same_arrays(first, expected)
    if again is None:  # ragged boxes: SCAN export must refuse, naming the odd images
        with pytest.raises(PrepError, match="same number of boxes") as info:
            export_features(tmp_path / "first", to, tmp_path / "exported")
        counts = {s: len(r["boxes"]) for s, r in records.items()}
        common = int(re.search(r"most have (\d+)", str(info.value)).group(1))
        assert list(counts.values()).count(common) == max(map(list(counts.values()).count, counts.values()))
        for sid, n in counts.items():
            assert (f"{sid} ({n} boxes)" in str(info.value)) == (n != common)
        assert not list((tmp_path / "exported").glob("*.npy"))
        return
    export_features(tmp_path / "first", to, tmp_path / "exported", quiet=True)
    import_features(again, tmp_path / "exported", tmp_path / "second", quiet=True)
    assert_same_arrays(store_arrays(tmp_path / "second"), first)
    assert verify(tmp_path / "second").ok


def test_scan_export_arrays_are_what_np_load_reads_in_key_order(make_features, tmp_path):
    features, regions = make_features(["b.jpg", "a.jpg", "c.jpg"], n_boxes=3, dim=6)
    export_features(features, "scan-precomp", tmp_path / "scan")
    ims = np.load(tmp_path / "scan/all_ims.npy")
    assert ims.dtype == np.float32 and ims.shape == (3, 3, 6)
    keys = (tmp_path / "scan/all_ids.txt").read_text().splitlines()
    assert keys == ["a.jpg", "b.jpg", "c.jpg"]
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(ims[i], regions[key].features)
    assert not (tmp_path / "scan/all_caps.txt").exists()


def test_scan_export_with_splits_writes_five_captions_per_image_in_image_order(make_features, tmp_path):
    features, regions = make_features(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], n_boxes=2, dim=4)
    caps = {k: [f"{k} caption {j}" for j in range(6 if k == "a.jpg" else 5)] for k in regions}
    splits = write_splits(tmp_path / "splits", features,
                          {"train": {"c.jpg": caps["c.jpg"], "a.jpg": caps["a.jpg"]},
                           "val": {"b.jpg": caps["b.jpg"]}, "test": {"d.jpg": caps["d.jpg"]}})
    res = CliRunner().invoke(main, ["export-features", str(features), "--to", "scan-precomp",
                                    str(tmp_path / "scan"), "--splits", str(splits), "--quiet"])
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "scan/train_caps.txt").read_text().splitlines()
    assert lines == caps["a.jpg"][:5] + caps["c.jpg"]  # caption i belongs to image i // 5
    assert (tmp_path / "scan/train_ids.txt").read_text().splitlines() == ["a.jpg", "c.jpg"]
    np.testing.assert_array_equal(np.load(tmp_path / "scan/dev_ims.npy")[0], regions["b.jpg"].features)
    assert (tmp_path / "scan/test_ids.txt").read_text() == "d.jpg\n"


def test_scan_export_refuses_images_with_fewer_than_five_captions(make_features, tmp_path):
    features, _ = make_features(["a.jpg", "b.jpg"], n_boxes=2, dim=4)
    splits = write_splits(tmp_path / "splits", features,
                          {"train": {"a.jpg": ["x"] * 5, "b.jpg": ["y"] * 3}, "val": {}, "test": {}})
    with pytest.raises(PrepError, match=r"fewer, e.g. b.jpg \(3\)"):
        export_features(features, "scan-precomp", tmp_path / "scan", splits=splits)


def test_butd_tsv_export_is_the_caffe_field_layout(make_features, tmp_path):
    features, regions = make_features(["x/a.jpg", "b.jpg"], n_boxes={"x/a.jpg": 2, "b.jpg": 3}, dim=4)
    key_map = tmp_path / "map.csv"
    key_map.write_text("id,image_key\n17,x/a.jpg\n5,b.jpg\n")
    export_features(features, "butd-tsv", tmp_path / "tsv", key_map=key_map)
    rows = [line.split("\t") for line in (tmp_path / "tsv/features.tsv").read_text().splitlines()]
    assert [r[0] for r in rows] == ["5", "17"]  # key order: b.jpg, x/a.jpg
    image_id, w, h, n, boxes, feats = rows[1]
    r = regions["x/a.jpg"]
    assert (int(w), int(h), int(n)) == (r.width, r.height, 2)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(boxes), np.float32).reshape(2, 4), r.boxes)
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(feats), np.float32).reshape(2, 4), r.features)


def test_splits_option_with_a_non_scan_format_is_refused(make_features, tmp_path):
    features, _ = make_features(["a.jpg"])
    with pytest.raises(PrepError, match="--splits applies to --to scan-precomp only"):
        export_features(features, "teran", tmp_path / "t", splits=tmp_path)
