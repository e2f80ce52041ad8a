"""import-features: every community format lands in features/ with the source's arrays, malformed
rows become status=error rows, and a rerun is resumable / a no-op / refused like extract-regions."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from formats_fixtures import (butd_row, lxmert_row, make_records, write_bua_npz, write_scan,
                              write_teran, write_tsv)
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.manifests.features import FeatureStore
from teranprep.pipeline.formats import import_features
from teranprep.pipeline.verify import verify

IDS = ["391895", "522418", "184613", "318219", "554625"]  # deliberately not in sorted order


def assert_store_matches(features_dir, records, keys=None, columns=(), sizes=True):
    keys = keys or {sid: sid for sid in records}
    with FeatureStore(features_dir) as store:
        assert store.keys() == sorted(keys.values())
        for sid, r in records.items():
            got = store[keys[sid]]
            np.testing.assert_array_equal(got.features, r["features"])
            np.testing.assert_array_equal(got.boxes, r["boxes"])
            if sizes:
                assert (got.width, got.height) == (r["width"], r["height"])
            for col in columns:
                np.testing.assert_array_equal(getattr(got, col), r[col])


def errors_by_key(features_dir):
    index = pd.read_parquet(features_dir / "index.parquet")
    bad = index[index["status"] == "error"]
    return dict(zip(bad["image_key"], bad["error"]))


def test_butd_tsv_rows_import_with_their_arrays_and_malformed_rows_become_error_rows(tmp_path):
    records = make_records(IDS)
    good = [butd_row(s, r) for s, r in records.items()]
    extra = make_records(["bad_count", "bad_b64", "bad_n"], seed=1)
    wrong_count = "\t".join(butd_row("bad_count", extra["bad_count"]).split("\t")[:5])
    fields = butd_row("bad_b64", extra["bad_b64"]).split("\t")
    fields[5] = fields[5][:-8] + "!!!!" + fields[5][-4:]
    bad_b64 = "\t".join(fields)
    fields = butd_row("bad_n", extra["bad_n"]).split("\t")
    fields[3] = str(int(fields[3]) + 1)
    bad_n = "\t".join(fields)
    tsv = write_tsv(tmp_path / "feats.tsv", [good[0], wrong_count, good[1], bad_b64, good[2],
                                             "", bad_n, *good[3:]])
    res = import_features("butd-tsv", tsv, tmp_path / "features", shard_size=3, quiet=True)
    assert (res.n_ok, res.n_error) == (5, 3)
    assert_store_matches(tmp_path / "features", records)
    errors = errors_by_key(tmp_path / "features")
    assert set(errors) == {"bad_count", "bad_b64", "bad_n"}
    assert "5 fields" in errors["bad_count"] and "line 2" in errors["bad_count"]
    assert "base64" in errors["bad_b64"]
    assert "num_boxes" in errors["bad_n"]
    assert verify(tmp_path / "features").ok


def test_lxmert_tsv_reads_height_before_width_and_keeps_object_and_attribute_columns(tmp_path):
    records = make_records(IDS[:3])
    tsv = write_tsv(tmp_path / "lx.tsv", [lxmert_row(s, r) for s, r in records.items()])
    import_features("lxmert-tsv", tsv, tmp_path / "features", quiet=True)
    assert_store_matches(tmp_path / "features", records,
                         columns=("class_ids", "class_scores", "attr_ids", "attr_scores"))


def test_tsv_directory_of_per_gpu_files_is_one_source(tmp_path):
    records = make_records(IDS)
    rows = [butd_row(s, r) for s, r in records.items()]
    (tmp_path / "src").mkdir()
    write_tsv(tmp_path / "src" / "x.tsv.0", rows[:2])
    write_tsv(tmp_path / "src" / "x.tsv.1", rows[2:])
    import_features("butd-tsv", tmp_path / "src", tmp_path / "features", quiet=True)
    assert_store_matches(tmp_path / "features", records)


def test_bua_npz_info_is_read_through_the_restricted_unpickler(tmp_path):
    records = make_records(IDS[:3])
    write_bua_npz(tmp_path / "npz", records)
    import_features("bua-npz", tmp_path / "npz", tmp_path / "features", quiet=True)
    assert_store_matches(tmp_path / "features", records,
                         columns=("class_ids", "class_scores", "attr_ids", "attr_scores"))


class _Payload:
    """What a hostile `info` holds: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bua_npz_with_a_code_executing_pickle_is_refused_per_file_without_running_it(tmp_path):
    records = make_records(IDS[:2])
    write_bua_npz(tmp_path / "npz", records)
    marker = tmp_path / "pwned"
    r = make_records(["evil"], seed=3)["evil"]
    np.savez(tmp_path / "npz" / "evil.npz", x=r["features"], bbox=r["boxes"],
             num_bbox=len(r["boxes"]), image_h=r["height"], image_w=r["width"],
             info={"objects_id": r["class_ids"], "hook": _Payload(marker)})
    res = import_features("bua-npz", tmp_path / "npz", tmp_path / "features", quiet=True)
    assert not marker.exists()
    assert (res.n_ok, res.n_error) == (2, 1)
    error = errors_by_key(tmp_path / "features")["evil"]
    assert "refused pickled global" in error and "system" in error
    assert_store_matches(tmp_path / "features", records)
    # The fixture is live: numpy's own loader with pickles allowed does run it.
    with np.load(tmp_path / "npz" / "evil.npz", allow_pickle=True) as npz:
        npz["info"]
    assert marker.exists()


def test_teran_sizes_are_unknown_without_a_size_file_and_taken_from_it_when_given(tmp_path):
    records = make_records(IDS[:3])
    write_teran(tmp_path / "teran", records, sizes=True)
    res = import_features("teran", tmp_path / "teran", tmp_path / "f1", quiet=True)
    assert_store_matches(tmp_path / "f1", records, sizes=False)
    with FeatureStore(tmp_path / "f1") as store:
        assert {(store[k].width, store[k].height) for k in store.keys()} == {(-1, -1)}
    assert any("-1" in w for w in res.manifest["import"]["warnings"])
    import_features("teran", tmp_path / "teran", tmp_path / "f2", sizes=tmp_path / "teran/sizes.csv",
                    quiet=True)
    assert_store_matches(tmp_path / "f2", records)


def test_teran_image_without_its_box_file_is_an_error_row(tmp_path):
    records = make_records(IDS[:3])
    write_teran(tmp_path / "teran", records)
    (tmp_path / "teran/bu_box" / f"{IDS[1]}.npy").unlink()
    res = import_features("teran", tmp_path / "teran", tmp_path / "features", quiet=True)
    assert (res.n_ok, res.n_error) == (2, 1)
    assert "missing" in errors_by_key(tmp_path / "features")[IDS[1]]


def test_scan_precomp_reads_rows_ids_boxes_and_sizes(tmp_path):
    records = make_records(IDS, boxes=(3, 3))
    write_scan(tmp_path / "scan", "train", dict(list(records.items())[:3]))
    write_scan(tmp_path / "scan", "dev", dict(list(records.items())[3:]))
    res = import_features("scan-precomp", tmp_path / "scan", tmp_path / "features", quiet=True)
    assert res.n_ok == 5
    assert_store_matches(tmp_path / "features", records)


def test_scan_precomp_without_ids_or_boxes_keys_by_split_row_with_zero_boxes(tmp_path):
    records = make_records(IDS[:2], boxes=(3, 3))
    write_scan(tmp_path / "scan", "test", records, ids=False, extras=False)
    res = import_features("scan-precomp", tmp_path / "scan", tmp_path / "features", quiet=True)
    with FeatureStore(tmp_path / "features") as store:
        assert store.keys() == ["test/0", "test/1"]
        np.testing.assert_array_equal(store["test/1"].features, records[IDS[1]]["features"])
        assert not store["test/1"].boxes.any()
    assert any("zeros" in w for w in res.manifest["import"]["warnings"])


def test_scan_precomp_ids_file_of_the_wrong_length_is_refused(tmp_path):
    write_scan(tmp_path / "scan", "train", make_records(IDS[:3], boxes=(3, 3)))
    (tmp_path / "scan/train_ids.txt").write_text("a\nb\n")
    with pytest.raises(PrepError, match="train_ids.txt: 2 ids for 3 rows"):
        import_features("scan-precomp", tmp_path / "scan", tmp_path / "features", quiet=True)


def test_key_map_names_images_and_unmapped_ids_are_error_rows(tmp_path):
    records = make_records(IDS[:3])
    tsv = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in records.items()])
    key_map = tmp_path / "map.csv"
    key_map.write_text(f"id,image_key\n{IDS[0]},val2014/b.jpg\n{IDS[1]},train2014/a.jpg\n")
    res = import_features("butd-tsv", tsv, tmp_path / "features", key_map=key_map, quiet=True)
    assert (res.n_ok, res.n_error) == (2, 1)
    keys = {IDS[0]: "val2014/b.jpg", IDS[1]: "train2014/a.jpg"}
    assert_store_matches(tmp_path / "features", {k: records[k] for k in keys}, keys=keys)
    assert "not in --key-map" in errors_by_key(tmp_path / "features")[IDS[2]]


def test_key_map_giving_two_ids_one_key_is_refused(tmp_path):
    tsv = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in make_records(IDS[:2]).items()])
    key_map = tmp_path / "map.csv"
    key_map.write_text(f"id,image_key\n{IDS[0]},a.jpg\n{IDS[1]},a.jpg\n")
    with pytest.raises(PrepError, match="map.csv: line 3: image_key 'a.jpg'"):
        import_features("butd-tsv", tsv, tmp_path / "features", key_map=key_map, quiet=True)


def test_repeated_id_keeps_the_first_row_and_is_listed(tmp_path):
    records = make_records(IDS[:2])
    again = make_records([IDS[0]], seed=9)[IDS[0]]
    tsv = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in records.items()]
                    + [butd_row(IDS[0], again)])
    res = import_features("butd-tsv", tsv, tmp_path / "features", quiet=True)
    assert res.manifest["import"]["duplicates"]["count"] == 1
    assert_store_matches(tmp_path / "features", records)


@pytest.fixture
def tsv_source(tmp_path):
    records = make_records([f"{i:04d}" for i in range(7)])
    return write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in records.items()]), records


def test_rerun_with_same_parameters_is_a_no_op(tmp_path, tsv_source):
    tsv, _ = tsv_source
    out = tmp_path / "features"
    first = import_features("butd-tsv", tsv, out, shard_size=3, quiet=True)
    manifest_bytes = (out / "manifest.json").read_bytes()
    again = import_features("butd-tsv", tsv, out, shard_size=3, quiet=True)
    assert (first.shards_run, again.shards_run) == (3, 0)
    assert (out / "manifest.json").read_bytes() == manifest_bytes


def test_interrupted_import_redoes_only_the_missing_shard(tmp_path, tsv_source):
    tsv, records = tsv_source
    out = tmp_path / "features"
    import_features("butd-tsv", tsv, out, shard_size=3, quiet=True)
    kept = (out / "shards/regions-00000.h5").stat().st_mtime_ns
    (out / "shards/regions-00001.json").unlink()  # as if killed before its marker was written
    (out / "manifest.json").unlink()
    res = import_features("butd-tsv", tsv, out, shard_size=3, quiet=True)
    assert res.shards_run == 1
    assert (out / "shards/regions-00000.h5").stat().st_mtime_ns == kept
    assert_store_matches(out, records)
    assert verify(out).ok


def test_other_parameters_are_refused_unless_overwrite(tmp_path, tsv_source):
    tsv, records = tsv_source
    out = tmp_path / "features"
    import_features("butd-tsv", tsv, out, shard_size=3, quiet=True)
    res = CliRunner().invoke(main, ["import-features", "butd-tsv", str(tsv), str(out),
                                    "--shard-size", "4", "--quiet"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    res = CliRunner().invoke(main, ["import-features", "butd-tsv", str(tsv), str(out),
                                    "--shard-size", "4", "--overwrite", "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "shards").glob("*.h5")) == ["regions-00000.h5", "regions-00001.h5"]
    assert_store_matches(out, records)
    assert verify(out).ok


def test_cli_format_choices_match_the_pipeline():
    from teranprep.commands import formats as cmd
    from teranprep.pipeline.formats import EXPORT_FORMATS, IMPORT_FORMATS
    assert cmd._IMPORT == IMPORT_FORMATS and cmd._EXPORT == EXPORT_FORMATS


def test_bua_npz_info_pickled_by_numpy_1_module_names_is_accepted(tmp_path):
    """MILVLG files were written with numpy 1.x, whose pickles name numpy.core.multiarray."""
    import io
    import pickle
    import zipfile
    records = make_records(IDS[:1])
    write_bua_npz(tmp_path / "npz", records)
    path = tmp_path / "npz" / f"{IDS[0]}.npz"
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    r = records[IDS[0]]
    info = np.array({"objects_id": r["class_ids"], "objects_conf": r["class_scores"],
                     "attrs_id": r["attr_ids"], "attrs_conf": r["attr_scores"]}, dtype=object)
    # Protocol 2 names globals in newline-terminated text, so the module can be renamed in place.
    legacy = pickle.dumps(info, protocol=2)
    assert b"numpy._core.multiarray" in legacy
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    members["info.npy"] = buf.getvalue() + legacy.replace(b"numpy._core.", b"numpy.core.")
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    import_features("bua-npz", tmp_path / "npz", tmp_path / "features", quiet=True)
    assert_store_matches(tmp_path / "features", records,
                         columns=("class_ids", "class_scores", "attr_ids", "attr_scores"))


def test_max_error_rate_fails_the_stage_but_keeps_what_was_written(tmp_path):
    records = make_records(IDS[:3])
    tsv = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in records.items()] + ["x\t1"])
    res = CliRunner().invoke(main, ["import-features", "butd-tsv", str(tsv), str(tmp_path / "features"),
                                    "--max-error-rate", "0.2", "--quiet"])
    assert res.exit_code == 2 and "1 of 4 images failed (25.0% > --max-error-rate 20%)" in res.output
    # Kept, but marked failed: no later stage reads it until a run with a passing limit.
    with pytest.raises(PrepError, match="written by a failed import-features run"):
        FeatureStore(tmp_path / "features")
    res = CliRunner().invoke(main, ["import-features", "butd-tsv", str(tsv), str(tmp_path / "features"),
                                    "--max-error-rate", "0.3", "--quiet"])
    assert res.exit_code == 0 and "nothing to do" in res.output, res.output
    assert_store_matches(tmp_path / "features", records)


def test_import_never_loads_torch_yet_records_its_version(tmp_path):
    """Loading torch alone costs ~600 MB of RSS: the 500 MB import budget depends on skipping it."""
    import json
    import subprocess
    import sys
    import torch
    tsv = write_tsv(tmp_path / "f.tsv", [butd_row(s, r) for s, r in make_records(IDS[:2]).items()])
    code = ("import sys; from teranprep.cli import main\n"
            "try:\n    main(args=sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, "import-features", "butd-tsv", str(tsv),
                           str(tmp_path / "features"), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "features/manifest.json").read_text())
    assert manifest["environment"]["torch"] == torch.__version__
