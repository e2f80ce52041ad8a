"""The one sharded-stage engine (pipeline/common/sharded.py) under extract-regions,
import-features and index: one added item runs exactly one new shard and leaves every other
shard file byte- and mtime-identical; a changed item re-runs only its shard; the dry run says
why each shard would run, in the same shape for all three stages."""

import os
import re
import time

import pytest

from conftest import write_images
from formats_fixtures import make_records, write_bua_npz
from search_fixtures import planted_run  # noqa: F401 - the session fixture
from teranprep.pipeline.extract import extract_regions
from teranprep.pipeline.formats import import_features
from teranprep.pipeline.index import build_index
from teranprep.pipeline.verify import verify

FAST = dict(model="tv-frcnn-mbv3-320", random_weights=0, batch_size=2, quiet=True)


def shard_files(out):
    """{file name: (bytes, mtime_ns)} of every shard file and marker."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted((out / "shards").glob("regions-*"))}


def assert_exactly_one_new_shard(before, after, expected_new):
    """Every earlier shard file is untouched (bytes and mtime); the only new files are one
    shard and its marker."""
    for name, (data, mtime) in before.items():
        assert name in after, name
        assert after[name][0] == data, f"{name} was rewritten"
        assert after[name][1] == mtime, f"{name} was touched"
    assert sorted(set(after) - set(before)) == [f"{expected_new}.h5", f"{expected_new}.json"]


def settle():
    # mtimes are compared to the nanosecond: a rewrite within the same clock tick would hide
    time.sleep(0.02)


# ---------------------------------------------------------------- extract-regions

def test_extract_one_added_image_that_sorts_first_runs_one_shard(image_dir, tmp_path):
    write_images(image_dir, 5)
    out = tmp_path / "f"
    first = extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    assert first.shards_run == 3
    before = shard_files(out)
    settle()
    write_images(tmp_path / "more", 1, seed=7)
    (tmp_path / "more" / "img000.jpg").rename(image_dir / "aaa.jpg")  # a key that sorts first
    grown = extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    assert grown.shards_run == 1 and grown.n_images == 6
    assert_exactly_one_new_shard(before, shard_files(out), "regions-00003")
    assert verify(out).ok


def test_extract_a_changed_image_reruns_only_its_shard(image_dir, tmp_path):
    keys = write_images(image_dir, 5)
    out = tmp_path / "f"
    extract_regions(image_dir, out, workers=0, shard_size=2, **FAST)
    before = shard_files(out)
    settle()
    changed = image_dir / keys[2]  # the first image of shard 1
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    lines = []
    extract_regions(image_dir, out, shard_size=2, dry_run=True, echo=lines.append, **FAST)
    assert [line for line in lines if "[" in line and "complete" not in line] == [
        f"  regions-00001.h5       2 images  {keys[2]} .. {keys[3]}  [1 changed]"]
    assert extract_regions(image_dir, out, workers=0, shard_size=2, **FAST).shards_run == 1
    after = shard_files(out)
    for name in ("regions-00000.h5", "regions-00000.json", "regions-00002.h5", "regions-00002.json"):
        assert after[name] == before[name]
    assert after["regions-00001.json"][1] != before["regions-00001.json"][1]


# ---------------------------------------------------------------- import-features

def npz_source(root, ids, seed=0, dim=8):
    return write_bua_npz(root, make_records(ids, dim=dim, seed=seed))


def test_import_one_added_file_that_sorts_first_runs_one_shard(tmp_path):
    # the case: 7 bua-npz files at --shard-size 2, then one more whose key sorts first
    src = npz_source(tmp_path / "npz", [f"b{i}" for i in range(7)])
    out = tmp_path / "features"
    assert import_features("bua-npz", src, out, shard_size=2, quiet=True).shards_run == 4
    before = shard_files(out)
    settle()
    npz_source(src, ["a0"], seed=1)
    grown = import_features("bua-npz", src, out, shard_size=2, quiet=True)
    assert grown.shards_run == 1 and grown.n_images == 8
    assert_exactly_one_new_shard(before, shard_files(out), "regions-00004")
    assert verify(out).ok
    # the same again is a no-op
    assert import_features("bua-npz", src, out, shard_size=2, quiet=True).shards_run == 0


def test_import_overwrite_replans_in_key_order(tmp_path):
    src = npz_source(tmp_path / "npz", [f"b{i}" for i in range(3)])
    out = tmp_path / "features"
    import_features("bua-npz", src, out, shard_size=2, quiet=True)
    npz_source(src, ["a0"], seed=1)
    import_features("bua-npz", src, out, shard_size=2, quiet=True)
    import json
    plan = json.loads((out / "shards" / "plan.json").read_text())
    assert plan["shards"] == {"0": ["b0", "b1"], "1": ["b2"], "2": ["a0"]}
    import_features("bua-npz", src, out, shard_size=2, quiet=True, overwrite=True)
    plan = json.loads((out / "shards" / "plan.json").read_text())
    assert plan["shards"] == {"0": ["a0", "b0"], "1": ["b1", "b2"]}
    assert sorted(p.name for p in (out / "shards").glob("*.h5")) == ["regions-00000.h5", "regions-00001.h5"]


# ---------------------------------------------------------------- index

def test_index_one_added_image_that_sorts_first_runs_one_shard(planted_run, tmp_path):  # noqa: F811
    src = npz_source(tmp_path / "npz", [f"b{i}" for i in range(5)], dim=16)
    features = tmp_path / "features"
    import_features("bua-npz", src, features, shard_size=2, quiet=True)
    out = tmp_path / "index"
    quiet = dict(shard_size=2, echo=lambda *_: None)
    first = build_index(planted_run["run"], features, out, **quiet)
    assert first.shards_run == 3 and first.n_images == 5
    before = shard_files(out)
    settle()
    npz_source(src, ["a0"], seed=1, dim=16)
    assert import_features("bua-npz", src, features, shard_size=2, quiet=True).shards_run == 1
    grown = build_index(planted_run["run"], features, out, **quiet)
    assert grown.shards_run == 1 and grown.n_images == 6
    assert_exactly_one_new_shard(before, shard_files(out), "regions-00003")
    assert verify(out).ok
    assert build_index(planted_run["run"], features, out, **quiet).shards_run == 0


# ---------------------------------------------------------------- one dry-run shape

SHARD_LINE = re.compile(r"^  regions-\d{5}\.h5 +\d+ (images) {2}\S+ \.\. \S+ {2}\[(complete|new images)\]$")
HEAD_LINE = re.compile(r"^dry run: (\d+) images -> (\d+) shards of up to 2 images in .+/shards; "
                       r"(\d+) complete, (\d+) to run$")


def dry_run_shape(lines):
    """(head numbers, [state of each shard]) after checking every line's form."""
    head = HEAD_LINE.match(lines[0])
    assert head, lines[0]
    states = []
    for line in lines[1:]:
        m = SHARD_LINE.match(line)
        assert m, line
        states.append(m.group(2))
    return tuple(int(g) for g in head.groups()), states


def test_dry_run_report_has_the_same_shape_for_extract_import_and_index(planted_run, image_dir,  # noqa: F811
                                                                        tmp_path):
    write_images(image_dir, 3)
    extract_out = tmp_path / "extracted"
    extract_regions(image_dir, extract_out, workers=0, shard_size=2, limit=2, **FAST)
    src = npz_source(tmp_path / "npz", ["b0", "b1"], dim=16)
    import_out = tmp_path / "imported"
    import_features("bua-npz", src, import_out, shard_size=2, quiet=True)
    index_out = tmp_path / "index"
    build_index(planted_run["run"], import_out, index_out, shard_size=2, echo=lambda *_: None)
    npz_source(src, ["c0"], seed=1, dim=16)

    reports = {}
    lines = []
    extract_regions(image_dir, extract_out, shard_size=2, dry_run=True, echo=lines.append, **FAST)
    reports["extract"] = dry_run_shape(lines)
    lines = []
    import_features("bua-npz", src, import_out, shard_size=2, dry_run=True, echo=lines.append)
    reports["import"] = dry_run_shape(lines)
    # the index's dry run against features that have not grown yet: complete, nothing to run
    lines = []
    build_index(planted_run["run"], import_out, index_out, shard_size=2, dry_run=True, echo=lines.append)
    reports["index (current)"] = dry_run_shape(lines)
    import_features("bua-npz", src, import_out, shard_size=2, quiet=True)
    lines = []
    build_index(planted_run["run"], import_out, index_out, shard_size=2, dry_run=True, echo=lines.append)
    reports["index"] = dry_run_shape(lines)
    assert reports == {"extract": ((3, 2, 1, 1), ["complete", "new images"]),
                       "import": ((3, 2, 1, 1), ["complete", "new images"]),
                       "index (current)": ((2, 1, 1, 0), ["complete"]),
                       "index": ((3, 2, 1, 1), ["complete", "new images"])}
    # a dry run writes nothing
    assert sorted(p.name for p in (index_out / "shards").glob("*.h5")) == ["regions-00000.h5"]


@pytest.mark.parametrize("stage", ["import", "index"])
def test_dry_run_on_a_fresh_folder_writes_nothing(stage, planted_run, tmp_path):  # noqa: F811
    src = npz_source(tmp_path / "npz", ["b0", "b1", "b2"], dim=16)
    lines = []
    if stage == "import":
        import_features("bua-npz", src, tmp_path / "out", shard_size=2, dry_run=True, echo=lines.append)
    else:
        import_features("bua-npz", src, tmp_path / "features", shard_size=2, quiet=True)
        build_index(planted_run["run"], tmp_path / "features", tmp_path / "out", shard_size=2,
                    dry_run=True, echo=lines.append)
    assert dry_run_shape(lines) == ((3, 2, 0, 2), ["new images", "new images"])
    assert not (tmp_path / "out").exists()


def test_the_extract_command_builds_typed_options_that_the_manifest_records(image_dir, tmp_path):
    import json
    from click.testing import CliRunner
    from teranprep.cli import main
    from teranprep.pipeline.extract import ExtractOptions
    write_images(image_dir, 2)
    out = tmp_path / "f"
    res = CliRunner().invoke(main, ["extract-regions", str(image_dir), str(out), "--model", "tv-frcnn-mbv3-320",
                                    "--random-weights", "3", "--workers", "0", "--shard-size", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    recorded = json.loads((out / "manifest.json").read_text())["options"]
    expected = ExtractOptions(model="tv-frcnn-mbv3-320", random_weights=3, workers=0, shard_size=5,
                              quiet=True).recorded()
    assert recorded == json.loads(json.dumps(expected))
    with pytest.raises(TypeError, match="not both"):
        extract_regions(image_dir, out, ExtractOptions(), shard_size=2)
