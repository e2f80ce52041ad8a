"""prep verify names each kind of damage with the file it is in, and exits non-zero."""

import json
import shutil

import pandas as pd
import pytest
from click.testing import CliRunner

from teranprep.cli import main


@pytest.fixture
def features(make_features):
    out, _ = make_features(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"], n_boxes=4, dim=16, shard_size=2)
    return out


def run_verify(path):
    return CliRunner().invoke(main, ["verify", str(path)])


def test_intact_output_passes(features):
    res = run_verify(features)
    assert res.exit_code == 0, res.output
    assert "consistent (3 files checked)" in res.output


def test_truncated_shard(features):
    shard = features / "shards/regions-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-500])
    res = run_verify(features)
    assert res.exit_code == 1
    assert f"{shard}: size" in res.output and "truncated" in res.output


def test_missing_shard(features):
    shard = features / "shards/regions-00002.h5"
    shard.unlink()
    res = run_verify(features)
    assert res.exit_code == 1
    assert f"{shard}: listed in the manifest but missing" in res.output
    assert "'e.jpg' is in no listed shard" in res.output


def test_flipped_bytes(features):
    shard = features / "shards/regions-00000.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # inside the feature data: structure intact, content changed
    shard.write_bytes(bytes(data))
    res = run_verify(features)
    assert res.exit_code == 1
    assert f"{shard}: sha256" in res.output


def test_edited_index(features):
    index_path = features / "index.parquet"
    index = pd.read_parquet(index_path)
    index.loc[index["image_key"] == "c.jpg", "row"] = 1  # points at another image's row
    index.to_parquet(index_path, index=False)
    res = run_verify(features)
    assert res.exit_code == 1
    assert f"{index_path}: sha256 differs" in res.output
    assert "'c.jpg' points at shards/regions-00001.h5 row 1, it is stored at shards/regions-00001.h5 row 0" in res.output


def test_duplicated_image_across_shards(features):
    manifest = json.loads((features / "manifest.json").read_text())
    shutil.copy(features / "shards/regions-00000.h5", features / "shards/regions-00003.h5")
    manifest["shards"].append(dict(manifest["shards"][0], path="shards/regions-00003.h5"))
    (features / "manifest.json").write_text(json.dumps(manifest))
    res = run_verify(features)
    assert res.exit_code == 1
    assert "'a.jpg' also stored in shards/regions-00000.h5" in res.output


def test_no_manifest(tmp_path):
    res = run_verify(tmp_path)
    assert res.exit_code == 1 and "manifest.json: missing" in res.output


def _write_store_as_another_tool(root, keys, dim=8, seed=0):
    """features/ written straight from docs/FORMATS.md with h5py, pandas and json (no teranprep
    writer); its index identifies files by size and sha256 only, without file_mtime_ns."""
    import hashlib

    import h5py
    import numpy as np
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    shard = root / "shards" / "regions-00000.h5"
    counts = rng.integers(2, 5, len(keys))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    xy = rng.uniform(0, 40, (offsets[-1], 2)).astype(np.float32)
    with h5py.File(shard, "w") as h5:
        h5.attrs.update({"format": "teranprep.regions", "format_version": 1, "feature_dim": dim,
                         "detector": "other-tool", "weights_sha256": "", "params_fingerprint": ""})
        h5["image_keys"] = np.array(keys, dtype=h5py.string_dtype("utf-8"))
        h5["image_size"] = np.tile(np.array([[100, 80]], np.int32), (len(keys), 1))
        h5["offsets"] = offsets
        h5["features"] = rng.standard_normal((offsets[-1], dim)).astype(np.float32)
        h5["boxes"] = np.concatenate([xy, xy + 20], 1)
    index = pd.DataFrame({"image_key": keys, "status": "ok", "error": "",
                          "shard": "shards/regions-00000.h5", "row": range(len(keys)), "width": 100,
                          "height": 80, "num_boxes": counts, "file_size": 1234,
                          "file_sha256": [hashlib.sha256(k.encode()).hexdigest() for k in keys]})
    index.to_parquet(root / "index.parquet", index=False)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    manifest = {"format": "teranprep.features", "format_version": 1, "stage": "other-tool",
                "feature_dim": dim, "dtype": "float32", "counts": {"ok": len(keys), "error": 0, "skipped": 0},
                "index": {"path": "index.parquet", "sha256": digest(root / "index.parquet")},
                "shards": [{"path": "shards/regions-00000.h5", "n_images": len(keys),
                            "n_boxes": int(offsets[-1]), "bytes": shard.stat().st_size,
                            "sha256": digest(shard)}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_store_of_another_tool_without_mtimes_verifies_and_evaluates(tmp_path):
    from teran_fixtures import CLS, DOT, SEP, make_tiny_bert, tiny_config, write_splits
    from teranprep.pipeline.evaluate import evaluate
    from teranprep.pipeline.train import train

    keys = [f"img{i:02d}.jpg" for i in range(12)]
    features = _write_store_as_another_tool(tmp_path / "features", keys)
    res = run_verify(features)
    assert res.exit_code == 0, res.output
    rows = lambda ks: [(k, [CLS, 5 + i % 30, 6 + i % 29, DOT, SEP]) for i, k in enumerate(ks) for _ in range(2)]  # noqa: E731
    splits = write_splits(tmp_path / "splits", features,
                          {"train": rows(keys[:6]), "val": rows(keys[6:8]), "test": rows(keys[8:])})
    run = tmp_path / "run"
    train(splits, tiny_config(make_tiny_bert(tmp_path / "bert"), epochs=1, val_every=100), run,
          stop_after=1, echo=lambda *_: None)
    metrics = evaluate(run, splits, echo=lambda *_: None)
    assert metrics["n_images"] == 4 and metrics["n_captions"] == 8
    # Neither size+hash nor size+mtime: the index cannot tell a changed input, and verify says so.
    index = pd.read_parquet(features / "index.parquet").drop(columns=["file_sha256"])
    index.to_parquet(features / "index.parquet", index=False)
    res = run_verify(features)
    assert res.exit_code == 1 and "file_sha256 (or file_mtime_ns)" in res.output


def test_error_rows_are_reported_by_reason_with_example_keys(tmp_path):
    """Error rows are outcomes, not damage: verify passes, and one warning counts them by reason."""
    from conftest import write_images
    from teranprep.manifests.error_summary import error_reason
    images = tmp_path / "images"
    write_images(images, 2)
    for name in ("e1.jpg", "e2.png", "e3.jpg"):
        (images / name).write_bytes(b"")
    (images / "text.png").write_text("not an image")
    out = tmp_path / "features"
    extract = ["extract-regions", str(images), str(out), "--model", "tv-frcnn-mbv3-320", "--random-weights",
               "0", "--workers", "0", "--max-error-rate", "1", "--quiet"]
    ran = CliRunner().invoke(main, extract)
    assert ran.exit_code == 0, ran.output
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = run_verify(out)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    lines = [l for l in res.stderr.splitlines() if "error rows" in l]
    assert lines == [f"warning: {out / 'index.parquet'}: 4 of 6 images are error rows (recorded, no "
                     "features): 3 empty file (e.g. 'e1.jpg', 'e2.png', 'e3.jpg'); "
                     "1 not an image Pillow can identify (e.g. 'text.png')"]
    assert f"verify: {out} is consistent" in res.stdout
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert run_verify(out).stderr == res.stderr  # a re-run says the same
    # the reason drops the key prefix, details and numbers
    assert error_reason("k.jpg", "k.jpg: decompression bomb: 9000x9000 pixels") == "decompression bomb"
    assert error_reason("k.jpg", "num_boxes is 3 but boxes holds 8 values") == "num_boxes is N but boxes holds N values"
