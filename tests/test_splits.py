"""build-splits: split membership, restval, seeded split, reports, lineage and resume semantics."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from teranprep.errors import PrepError
from teranprep.manifests.splits import (SPLIT_COLUMNS, check_lineage, read_split,
                                        read_splits_manifest)
from teranprep.pipeline.splits import build_splits

SPLITS = ("train", "val", "test")


def write_karpathy(path: Path, images: list[dict]) -> Path:
    """images: dicts with filename, optional filepath/split, sentences as plain strings."""
    doc = {"dataset": "coco", "images": [
        {**{k: v for k, v in image.items() if k != "sentences"}, "imgid": i,
         "sentences": [{"raw": raw, "tokens": raw.lower().split(), "sentid": 0}
                       for raw in image["sentences"]]}
        for i, image in enumerate(images)]}
    path.write_text(json.dumps(doc), "utf-8")
    return path


def load_all(out: Path) -> dict[str, pd.DataFrame]:
    return {name: read_split(out, name) for name in SPLITS}


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def karpathy_six(tmp_path, split_of_image):
    images = [{"filepath": "val2014", "filename": f"img{i}.jpg", "split": split,
               "sentences": [f"a dog number {i}", f"a cat number {i}"]}
              for i, split in enumerate(split_of_image)]
    return write_karpathy(tmp_path / "dataset_coco.json", images)


def test_karpathy_splits_keep_membership_keys_and_caption_positions(tmp_path, make_features):
    images = [
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": ["one", "two"]},
        {"filepath": "val2014", "filename": "a.jpg", "split": "val", "sentences": ["three"]},
        {"filename": "c.jpg", "split": "test", "sentences": ["four", "five"]},  # no filepath
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": ["six"]},
    ]
    captions = write_karpathy(tmp_path / "dataset_coco.json", images)
    features, _ = make_features(["train2014/b.jpg", "val2014/a.jpg", "c.jpg", "train2014/a.jpg"],
                                n_boxes=1, dim=4)
    result = build_splits(captions, features=features, out=tmp_path / "splits")
    frames = load_all(tmp_path / "splits")
    for frame in frames.values():
        assert tuple(frame.columns) == SPLIT_COLUMNS
    # caption_id is the caption's position in the file; rows are grouped by image key
    assert list(zip(frames["train"].image_key, frames["train"].caption_id, frames["train"].raw)) == [
        ("train2014/a.jpg", 5, "six"), ("train2014/b.jpg", 0, "one"), ("train2014/b.jpg", 1, "two")]
    assert list(zip(frames["val"].image_key, frames["val"].caption_id)) == [("val2014/a.jpg", 2)]
    assert list(zip(frames["test"].image_key, frames["test"].caption_id)) == [("c.jpg", 3), ("c.jpg", 4)]
    assert frames["train"].caption_id.dtype == "int64"
    counts = result.manifest["counts"]
    assert counts == {"train": {"captions": 3, "images": 2}, "val": {"captions": 1, "images": 1},
                      "test": {"captions": 2, "images": 1}}


@pytest.mark.parametrize("mode, restval_lands_in", [("train", "train"), ("val", "val"), ("drop", None)])
def test_restval_goes_where_the_mode_says(tmp_path, make_features, mode, restval_lands_in):
    captions = karpathy_six(tmp_path, ["train", "val", "test", "restval", "restval", "train"])
    features, _ = make_features([f"val2014/img{i}.jpg" for i in range(6)], n_boxes=1, dim=4)
    result = build_splits(captions, features=features, out=tmp_path / "splits", restval=mode)
    members = {name: set(frame.image_key) for name, frame in load_all(tmp_path / "splits").items()}
    restval = {"val2014/img3.jpg", "val2014/img4.jpg"}
    expected = {"train": {"val2014/img0.jpg", "val2014/img5.jpg"}, "val": {"val2014/img1.jpg"},
                "test": {"val2014/img2.jpg"}}
    if restval_lands_in:
        expected[restval_lands_in] |= restval
    assert members == expected
    assert result.manifest["dropped"]["restval_dropped"] == (4 if mode == "drop" else 0)


def test_image_key_template_maps_karpathy_names_to_feature_keys(tmp_path, make_features):
    captions = karpathy_six(tmp_path, ["train", "train", "val", "test", "train", "train"])
    features, _ = make_features([f"images/img{i}.jpg" for i in range(6)], n_boxes=1, dim=4)
    with pytest.raises(PrepError, match="missing.csv"):
        build_splits(captions, features=features, out=tmp_path / "splits")
    build_splits(captions, features=features, out=tmp_path / "splits2",
                 image_key_template="images/{filename}")
    assert set(read_split(tmp_path / "splits2", "val").image_key) == {"images/img2.jpg"}
    with pytest.raises(PrepError, match="--image-key-template"):
        build_splits(captions, features=features, out=tmp_path / "splits3",
                     image_key_template="{basename}")


def _csv_captions(path: Path, n_images: int, per_image: int = 2) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "file", "text"])
        for i in range(n_images):
            for j in range(per_image):
                writer.writerow([f"{i}-{j}", f"im{i:02d}.png", f"picture {i} caption {j}"])
    return path


def _expected_seeded_split(keys, val, test, seed):
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\x00{k}".encode()).hexdigest())
    return set(ranked[:val]), set(ranked[val:val + test]), set(ranked[val + test:])


def test_seeded_split_is_reproducible_disjoint_and_follows_the_seed(tmp_path, make_features):
    keys = [f"im{i:02d}.png" for i in range(30)]
    captions = _csv_captions(tmp_path / "caps.csv", 30)
    features, _ = make_features(keys, n_boxes=1, dim=4)
    common = dict(features=features, image_column="file", caption_column="text", val=5, test=4)
    build_splits(captions, out=tmp_path / "a", seed=7, **common)
    build_splits(captions, out=tmp_path / "b", seed=7, **common)
    build_splits(captions, out=tmp_path / "c", seed=8, **common)
    for name in SPLITS:  # same seed: the same bytes
        assert (tmp_path / "a" / f"{name}.parquet").read_bytes() == \
            (tmp_path / "b" / f"{name}.parquet").read_bytes()
    members = {d: {n: set(f.image_key) for n, f in load_all(tmp_path / d).items()} for d in "ac"}
    for split in members.values():
        assert len(split["val"]) == 5 and len(split["test"]) == 4 and len(split["train"]) == 21
        assert not (split["train"] & split["val"] or split["train"] & split["test"]
                    or split["val"] & split["test"])
        assert split["train"] | split["val"] | split["test"] == set(keys)
    # an independent rendering of the documented rule: rank by sha256(seed NUL key)
    assert (members["a"]["val"], members["a"]["test"], members["a"]["train"]) == \
        _expected_seeded_split(keys, 5, 4, 7)
    assert members["c"]["val"] != members["a"]["val"]
    # every caption of an image is in that image's split
    frames = load_all(tmp_path / "a")
    assert sum(len(f) for f in frames.values()) == 60
    assert all(len(f) == 2 * len(set(f.image_key)) for f in frames.values())


def test_csv_and_jsonl_with_custom_columns(tmp_path, make_features):
    features, _ = make_features(["pics/007.jpg", "pics/011.jpg", "pics/042.jpg"], n_boxes=1, dim=4)
    jsonl = tmp_path / "caps.jsonl"
    lines = [{"img": 7, "sentence": "Seven's caption"}, {"img": 11, "sentence": "eleven"},
             {"img": 42, "sentence": "forty two"}, {"img": 7, "sentence": "seven again"}]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", "utf-8")
    result = build_splits(jsonl, features=features, out=tmp_path / "s1", image_column="img",
                          caption_column="sentence", image_key_template="pics/{image:0>3}.jpg",
                          val=1, test=1)
    assert result.manifest["captions"]["format"] == "jsonl"
    rows = pd.concat(load_all(tmp_path / "s1").values())
    assert sorted(zip(rows.caption_id, rows.image_key, rows.raw)) == [
        (0, "pics/007.jpg", "Seven's caption"), (1, "pics/011.jpg", "eleven"),
        (2, "pics/042.jpg", "forty two"), (3, "pics/007.jpg", "seven again")]
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("caption\tpath\nA, quoted \"x\"\tpics/042.jpg\nb\tpics/011.jpg\nc\tpics/007.jpg\n",
                   "utf-8")
    build_splits(tsv, features=features, out=tmp_path / "s2", image_column="path", val=1, test=1)
    rows = pd.concat(load_all(tmp_path / "s2").values())
    assert dict(zip(rows.image_key, rows.raw))["pics/042.jpg"] == 'A, quoted "x"'
    with pytest.raises(PrepError, match="--caption-column"):
        build_splits(tsv, features=features, out=tmp_path / "s3", caption_column="text", val=1, test=1)


def test_duplicates_empty_and_invalid_utf8_are_reported_not_kept(tmp_path, make_features):
    features, _ = make_features(["a.jpg", "b.jpg", "c.jpg"], n_boxes=1, dim=4)
    body = (b'{"images": ['
            b'{"filename": "a.jpg", "split": "train", "sentences": ['
            b'{"raw": "A dog."}, {"raw": "a  DOG."}, {"raw": "   \\t "}, {"raw": ""}]},'
            b'{"filename": "b.jpg", "split": "val", "sentences": [{"raw": "bad \xff byte"}, {"raw": "A dog."}]},'
            b'{"filename": "c.jpg", "split": "test", "sentences": [{"raw": "lone \\ud800 escape"}, {"raw": "ok"}]}'
            b']}')
    captions = tmp_path / "dataset_flickr30k.json"
    captions.write_bytes(body)
    result = build_splits(captions, features=features, out=tmp_path / "splits")
    frames = load_all(tmp_path / "splits")
    kept = sorted((f.caption_id.tolist() for f in frames.values()), key=len)
    assert sorted(sum(kept, [])) == [0, 5, 7]  # the dog of b.jpg is another image's caption: kept
    assert result.manifest["dropped"] == {"duplicate": 1, "empty": 2, "invalid_utf8": 2,
                                          "malformed": 0, "missing_features": 0,
                                          "restval_dropped": 0}
    with open(tmp_path / "splits" / "dropped.csv", newline="", encoding="utf-8") as fh:
        report = {int(r["caption_id"]): (r["reason"], r["raw"]) for r in csv.DictReader(fh)}
    assert report == {1: ("duplicate", "a  DOG."), 2: ("empty", "   \t "), 3: ("empty", ""),
                      4: ("invalid_utf8", "bad \\xff byte"), 6: ("invalid_utf8", "lone \\ud800 escape")}


def test_missing_images_are_listed_and_fail_past_the_threshold(tmp_path, make_features):
    captions = karpathy_six(tmp_path, ["train", "train", "val", "test", "train", "train"])
    features, _ = make_features([f"val2014/img{i}.jpg" for i in (0, 1, 2, 3, 5)], n_boxes=1, dim=4)
    out = tmp_path / "splits"
    with pytest.raises(PrepError, match=r"missing\.csv: 2 captions \(1 images\)"):
        build_splits(captions, features=features, out=out)
    assert not (out / "manifest.json").exists()
    missing = pd.read_csv(out / "missing.csv")
    assert missing.to_dict("list") == {"caption_id": [8, 9], "image_key": ["val2014/img4.jpg"] * 2,
                                       "raw": ["a dog number 4", "a cat number 4"]}
    with pytest.raises(PrepError, match="--max-missing 1"):
        build_splits(captions, features=features, out=out, max_missing=1)
    result = build_splits(captions, features=features, out=out, max_missing=2)
    assert result.manifest["dropped"]["missing_features"] == 2
    assert "val2014/img4.jpg" not in set(read_split(out, "train").image_key)
    assert len(pd.read_csv(out / "missing.csv")) == 2


def test_lineage_check_fails_once_the_features_are_rewritten(tmp_path, make_features):
    captions = karpathy_six(tmp_path, ["train", "val", "test", "train", "train", "train"])
    keys = [f"val2014/img{i}.jpg" for i in range(6)]
    features, _ = make_features(keys, n_boxes=1, dim=4)
    out = tmp_path / "splits"
    build_splits(captions, features=features, out=out)
    assert read_splits_manifest(out)["features"]["path"] == "../features"
    assert check_lineage(out).resolve() == features.resolve()
    make_features(keys, n_boxes=2, dim=4, seed=1)  # same directory, new extraction
    with pytest.raises(PrepError, match="features changed since build-splits"):
        check_lineage(out)
    # and build-splits itself rebuilds against the new features (same parameters)
    result = build_splits(captions, features=features, out=out)
    assert not result.noop
    assert check_lineage(out).resolve() == features.resolve()


def test_rerun_with_same_inputs_leaves_every_file_untouched(tmp_path, make_features):
    captions = karpathy_six(tmp_path, ["train", "val", "test", "restval", "train", "train"])
    features, _ = make_features([f"val2014/img{i}.jpg" for i in range(6)], n_boxes=1, dim=4)
    out = tmp_path / "splits"
    build_splits(captions, features=features, out=out)
    before = snapshot(out)
    assert set(before) == {"manifest.json", "train.parquet", "val.parquet", "test.parquet",
                           "missing.csv", "dropped.csv", ".teranprep-owner.json", ".teranprep-lock"}
    result = build_splits(captions, features=features, out=out)
    assert result.noop
    assert snapshot(out) == before
    # a damaged output is not "up to date": the same parameters rebuild it
    (out / "val.parquet").write_bytes(b"garbage")
    assert not build_splits(captions, features=features, out=out).noop
    assert read_split(out, "val").image_key.tolist() == ["val2014/img1.jpg"] * 2


def test_changed_parameters_are_refused_unless_overwrite(tmp_path, make_features):
    captions = karpathy_six(tmp_path, ["train", "val", "test", "restval", "train", "train"])
    features, _ = make_features([f"val2014/img{i}.jpg" for i in range(6)], n_boxes=1, dim=4)
    out = tmp_path / "splits"
    build_splits(captions, features=features, out=out)
    before = snapshot(out)
    for change in ({"restval": "drop"}, {"max_tokens": 5}):
        with pytest.raises(PrepError, match=f"changed: {next(iter(change))}"):
            build_splits(captions, features=features, out=out, **change)
    assert snapshot(out) == before
    result = build_splits(captions, features=features, out=out, restval="drop", overwrite=True)
    assert result.manifest["parameters"]["restval"] == "drop"
    assert "val2014/img3.jpg" not in set(read_split(out, "train").image_key)
    # changed captions with unchanged parameters: rebuilt, not refused
    karpathy_six(tmp_path, ["train", "val", "test", "restval", "val", "train"])
    build_splits(captions, features=features, out=out, restval="drop")
    assert set(read_split(out, "val").image_key) == {"val2014/img1.jpg", "val2014/img4.jpg"}


def test_cli_reports_one_error_line_and_exit_code_2(tmp_path, make_features):
    captions = karpathy_six(tmp_path, ["train", "val", "test", "train", "train", "train"])
    features, _ = make_features([f"val2014/img{i}.jpg" for i in range(5)], n_boxes=1, dim=4)
    prep = Path(sys.executable).with_name("prep")
    cmd = [str(prep), "build-splits", str(captions), "--features", str(features),
           "--out", str(tmp_path / "splits")]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1
    assert "missing.csv" in failed.stderr and "--max-missing" in failed.stderr
    done = subprocess.run(cmd + ["--max-missing", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train 6 captions / 3 images" in done.stdout
