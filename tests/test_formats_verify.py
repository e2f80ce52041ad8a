"""prep verify on splits/: lineage, parquet schema, images in one split only, unique caption ids."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from formats_fixtures import write_splits
from teranprep.cli import main
from teranprep.pipeline.verify import verify

KEYS = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def captions(*keys):
    return {k: [f"{k} number {j}" for j in range(2)] for k in keys}


@pytest.fixture
def features(make_features):
    return make_features(KEYS, n_boxes=2, dim=4)[0]


def test_intact_splits_pass(features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg", "b.jpg"),
                                                          "val": captions("c.jpg"), "test": captions("d.jpg")})
    res = CliRunner().invoke(main, ["verify", str(splits)])
    assert res.exit_code == 0, res.output
    assert "consistent (3 files checked)" in res.output


def test_image_in_two_splits_is_named_with_both(features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg", "b.jpg"),
                                                          "val": captions("b.jpg"), "test": captions("d.jpg")})
    report = verify(splits)
    assert report.problems == [f"{splits}: 1 images are in two splits: 'b.jpg' (train and val)"]


def test_repeated_caption_ids_across_splits(features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg"), "val": captions("b.jpg"),
                                                          "test": captions("c.jpg")}, repeat_ids=True)
    report = verify(splits)
    assert report.problems == [f"{splits}: caption_id is not unique across splits (4 repeated ids): "
                               "e.g. 0, 1"]


def test_features_changed_since_build_splits_breaks_lineage(make_features, features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg"), "val": {}, "test": {}})
    make_features(KEYS, n_boxes=2, dim=4, seed=5)  # rewrites features/ with other values
    report = verify(splits)
    assert len(report.problems) == 1
    assert "manifest.json: sha256" in report.problems[0] and "re-run `prep build-splits`" in report.problems[0]


def test_wrong_column_type_and_edited_file_are_reported(features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg"), "val": captions("b.jpg"),
                                                          "test": {}})
    table = pq.read_table(splits / "val.parquet")
    table = table.set_column(4, "input_ids", table.column("input_ids").cast(pa.list_(pa.int64())))
    pq.write_table(table, splits / "val.parquet")
    problems = verify(splits).problems
    assert any(p.startswith(f"{splits / 'val.parquet'}: column 'input_ids' is list<")
               and p.endswith("int64>, expected list<item: int32>") for p in problems), problems
    assert f"{splits / 'val.parquet'}: size or sha256 differs from the manifest's" in " ".join(problems)


def test_split_image_without_ok_features_is_reported(features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg", "zzz.jpg"),
                                                          "val": {}, "test": {}})
    assert verify(splits).problems == [f"{splits}: 1 images have no ok features in "
                                       f"{splits / '../features'}: 'zzz.jpg'"]


def test_list_item_field_name_does_not_count_as_a_schema_difference(features, tmp_path):
    splits = write_splits(tmp_path / "splits", features, {"train": captions("a.jpg"), "val": {}, "test": {}})
    table = pq.read_table(splits / "train.parquet")
    renamed = pa.list_(pa.field("element", pa.int32()))
    table = table.set_column(4, "input_ids", table.column("input_ids").cast(renamed))
    pq.write_table(table, splits / "train.parquet")
    problems = verify(splits).problems
    assert [p for p in problems if "column" in p] == []
    assert len(problems) == 1 and "sha256 differs" in problems[0]
