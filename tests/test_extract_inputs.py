"""extract-regions on inputs as people store them: webdataset tar shards, parquet/CSV lists; precision."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import write_images
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.pipeline.common.distribute import default_threads, machine_cores
from teranprep.pipeline.extract import extract_regions
from teranprep.pipeline.common.inputs import discover_inputs, expand_braces, sample_key
from teranprep.pipeline.verify import verify
from test_extract import all_arrays, assert_same_arrays, snapshot

FAST = dict(model="tv-frcnn-mbv3-320", random_weights=0, batch_size=1, quiet=True, threads_per_worker=1)


def write_webdataset(image_dir, keys, out_dir, per_tar=3, suffix=".tar"):
    """img2dataset's layout: NNNNN.tar with <sample>.jpg/.png, <sample>.txt, <sample>.json.
    Members are written in a shuffled key order (tars are not sorted). -> {tar key: folder key}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    mapping = {}
    order = list(keys)
    random.Random(3).shuffle(order)
    for t in range(0, len(order), per_tar):
        name = f"{t // per_tar:05d}{suffix}"
        with tarfile.open(out_dir / name, "w:gz" if suffix.endswith("gz") else "w") as tar:
            for i, key in enumerate(order[t:t + per_tar]):
                sample = f"{t // per_tar:05d}{i:04d}"
                ext = key.rsplit(".", 1)[1]
                members = {f"{sample}.{ext}": (image_dir / key).read_bytes(),
                           f"{sample}.txt": f"a caption of {key}".encode(),
                           f"{sample}.json": json.dumps({"url": f"http://x/{key}"}).encode()}
                for member, data in members.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                mapping[f"{name}/{sample}"] = key
    return mapping


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{8..10}-{0..1}.tar") == ["8-0.tar", "8-1.tar", "9-0.tar", "9-1.tar",
                                                    "10-0.tar", "10-1.tar"]
    assert sample_key("dir/000123.seg.png") == ("dir/000123", "seg.png")


def test_tar_shards_give_the_folders_features_with_captions_in_the_index(image_dir, tmp_path):
    keys = write_images(image_dir, 5)
    mapping = write_webdataset(image_dir, keys, tmp_path / "wds")
    extract_regions(image_dir, tmp_path / "folder", workers=0, **FAST)
    out = tmp_path / "tars"
    result = extract_regions(str(tmp_path / "wds" / "{00000..00001}.tar"), out, workers=0,
                             shard_size=2, **FAST)
    assert result.n_ok == 5 and verify(out).ok
    folder = all_arrays(tmp_path / "folder")
    tars = all_arrays(out)
    assert set(tars) == set(mapping)
    # same bytes, same detector, same thread setting: the same bits whatever the container
    assert_same_arrays({k: tars[k] for k in mapping}, {k: folder[v] for k, v in mapping.items()})
    index = pd.read_parquet(out / "index.parquet").set_index("image_key")
    for tar_key, key in mapping.items():
        assert index.loc[tar_key, "caption"] == f"a caption of {key}"
        assert json.loads(index.loc[tar_key, "metadata"]) == {"url": f"http://x/{key}"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["kind"] == "tars" and manifest["input"]["tars"] == ["00000.tar", "00001.tar"]
    # a complete stage is a no-op for tars too
    before = snapshot(out)
    again = extract_regions(str(tmp_path / "wds" / "{00000..00001}.tar"), out, workers=0, shard_size=2, **FAST)
    assert again.shards_run == 0 and snapshot(out) == before


def test_compressed_tars_are_streamed_to_the_same_features(image_dir, tmp_path):
    keys = write_images(image_dir, 4)
    plain = write_webdataset(image_dir, keys, tmp_path / "plain")
    gz = write_webdataset(image_dir, keys, tmp_path / "gz", suffix=".tar.gz")
    inputs = discover_inputs(str(tmp_path / "gz" / "*.tar.gz"))
    assert not any("offset" in e.extra_dict() for e in inputs.entries)  # the streaming path
    extract_regions(str(tmp_path / "plain" / "*.tar"), tmp_path / "a", workers=0, shard_size=3, **FAST)
    extract_regions(str(tmp_path / "gz" / "*.tar.gz"), tmp_path / "b", workers=0, shard_size=3, **FAST)
    a, b = all_arrays(tmp_path / "a"), all_arrays(tmp_path / "b")
    rename = {k: k.replace(".tar/", ".tar.gz/") for k in plain}
    assert set(gz) == set(rename.values())
    assert_same_arrays({rename[k]: v for k, v in a.items()}, b)


def test_missing_tar_of_a_range_is_one_clear_error(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(PrepError, match="00001.tar: tar shard not found"):
        discover_inputs(str(tmp_path / "{00000..00001}.tar"))


def _cli(source, out, *extra):
    return [sys.executable, "-m", "teranprep", "extract-regions", str(source), str(out),
            "--model", "tv-frcnn-mbv3-320", "--random-weights", "0", "--shard-size", "2",
            "--batch-size", "1", "--threads-per-worker", "1", "--quiet", *extra]


def test_webdataset_extraction_killed_and_resumed_is_identical(image_dir, tmp_path):
    keys = write_images(image_dir, 9)
    write_webdataset(image_dir, keys, tmp_path / "wds", per_tar=4)
    source = str(tmp_path / "wds" / "{00000..00002}.tar")
    reference = tmp_path / "reference"
    extract_regions(source, reference, workers=0, shard_size=2, **FAST)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(source, out, "--workers", "1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("shards/*.json")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(5).uniform(0.0, 1.0))  # somewhere inside the next shards
    os.killpg(proc.pid, signal.SIGKILL)  # a real process group: the driver and its dask worker
    proc.wait()
    n_before = len(list(out.glob("shards/*.json")))
    assert 1 <= n_before < 5, "the kill should land after the first shard and before the end"
    done = subprocess.run(_cli(source, out, "--workers", "1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = verify(out)
    assert report.ok, report.problems
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert_same_arrays(all_arrays(out), all_arrays(reference))
    a = pd.read_parquet(out / "index.parquet").drop(columns=[])
    b = pd.read_parquet(reference / "index.parquet")
    assert a[["image_key", "caption", "metadata", "num_boxes"]].equals(b[["image_key", "caption", "metadata",
                                                                          "num_boxes"]])


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_list_of_paths_input(image_dir, tmp_path, suffix):
    keys = write_images(image_dir, 4)
    listed = keys[:3]
    frame = pd.DataFrame({"path": [f"images/{k}" for k in listed], "key": [f"id{i}" for i in range(3)]})
    list_path = tmp_path / f"list{suffix}"
    assert image_dir == tmp_path / "images"
    frame.to_parquet(list_path) if suffix == ".parquet" else frame.to_csv(list_path, index=False)
    out = tmp_path / "listed"
    result = extract_regions(list_path, out, workers=0, **FAST)
    assert result.n_ok == 3 and verify(out).ok
    extract_regions(image_dir, tmp_path / "folder", workers=0, **FAST)
    folder = all_arrays(tmp_path / "folder")
    assert_same_arrays(all_arrays(out), {f"id{i}": folder[k] for i, k in enumerate(listed)})
    assert json.loads((out / "manifest.json").read_text())["input"]["kind"] == "list"


def test_list_without_path_column_is_refused(tmp_path):
    pd.DataFrame({"file": ["a.jpg"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(PrepError, match="needs a `path` column"):
        discover_inputs(tmp_path / "l.csv")


def test_changed_precision_is_refused_on_resume_without_overwrite(image_dir, tmp_path):
    write_images(image_dir, 2)
    out = tmp_path / "f"
    base = ["extract-regions", str(image_dir), str(out), "--model", "butd-tiny", "--random-weights",
            "0", "--quiet", "--workers", "0"]
    runner = CliRunner()
    first = runner.invoke(main, base + ["--precision", "fp32"])
    assert first.exit_code == 0, first.output
    assert json.loads((out / "manifest.json").read_text())["parameters"]["precision"] == "fp32"
    before = snapshot(out)
    refused = runner.invoke(main, base + ["--precision", "bf16"])
    assert refused.exit_code == 2
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in refused.output
    assert snapshot(out) == before
    redone = runner.invoke(main, base + ["--precision", "bf16", "--overwrite"])
    assert redone.exit_code == 0, redone.output
    assert json.loads((out / "manifest.json").read_text())["parameters"]["precision"] == "bf16"


def test_the_bf16_hint_is_for_the_full_size_model_only(image_dir, tmp_path):
    """The hint measures the full-size BUTD ROI-head kernel: a butd-tiny run does not print it."""
    write_images(image_dir, 1)
    tiny = CliRunner().invoke(main, ["extract-regions", str(image_dir), str(tmp_path / "a"), "--model",
                                     "butd-tiny", "--random-weights", "0", "--workers", "0"])
    assert tiny.exit_code == 0, tiny.output
    assert "--precision bf16 would run" not in tiny.output


def test_the_bf16_hint_is_measured_once_per_cpu_cached_and_never_a_slowdown(tmp_path, monkeypatch):
    import json
    import re
    import torch
    from teranprep.extractors.precision import _cpu_name, bf16_speedup_hint, hint_cache_path
    monkeypatch.setenv("TERANPREP_HINT_CACHE", str(tmp_path / "hint.json"))
    first = bf16_speedup_hint(1)  # measured (~0.2 s) and written
    cache = json.loads(hint_cache_path().read_text())
    key = f"{_cpu_name()} | torch {torch.__version__} | 1 threads"
    measured = cache[key]
    assert first is None if measured < 1.2 else float(re.search(r"(\d+\.\d)x", first).group(1)) == round(measured, 1)
    mtime = hint_cache_path().stat().st_mtime_ns
    assert bf16_speedup_hint(1) == first and hint_cache_path().stat().st_mtime_ns == mtime  # read, not re-measured
    for ratio, says in ((0.5, None), (1.1, None), (2.0, "2.0x faster")):
        hint_cache_path().write_text(json.dumps({key: ratio}))
        hint = bf16_speedup_hint(1)
        assert (hint is None) if says is None else (says in hint), (ratio, hint)


def test_bf16_slowdown_warning_follows_the_measured_ratio_and_cpu_flags_name_the_bf16_hardware(tmp_path, monkeypatch):
    import json
    import torch
    from teranprep.extractors.precision import (_cpu_name, bf16_hardware, bf16_slowdown_warning,
                                                hint_cache_path)
    monkeypatch.setenv("TERANPREP_HINT_CACHE", str(tmp_path / "hint.json"))
    key = f"{_cpu_name()} | torch {torch.__version__} | 1 threads"
    for ratio, says in ((0.2, "5.0x SLOWER"), (0.99, "1.0x SLOWER"), (1.0, None), (4.0, None)):
        hint_cache_path().write_text(json.dumps({key: ratio}))
        warning = bf16_slowdown_warning(1)
        assert (warning is None) if says is None else (says in warning), (ratio, warning)
    assert bf16_hardware({"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"}) == "AMX"
    assert bf16_hardware({"avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert bf16_hardware({"avx512f", "avx512_vnni"}) == "none"  # Ice Lake
    assert bf16_hardware(set()) == "none"


def test_features_of_older_inference_arithmetic_are_not_resumed(image_dir, tmp_path, monkeypatch):
    """A folder begun by code that rounded differently (another butd.detector.INFERENCE) is
    refused on resume, not completed with features of a second kind."""
    import teranprep.extractors.butd.detector as butd_detector
    write_images(image_dir, 2)
    out = tmp_path / "f"
    base = ["extract-regions", str(image_dir), str(out), "--model", "butd-tiny", "--random-weights",
            "0", "--quiet", "--workers", "0"]
    runner = CliRunner()
    monkeypatch.setattr(butd_detector, "INFERENCE", "older-arithmetic")
    assert runner.invoke(main, base).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["parameters"]["inference"] == "older-arithmetic"
    before = snapshot(out)
    monkeypatch.undo()
    refused = runner.invoke(main, base)
    assert refused.exit_code == 2 and refused.output.startswith("error:"), refused.output
    assert snapshot(out) == before
    assert runner.invoke(main, base + ["--overwrite"]).exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["parameters"]["inference"] == butd_detector.INFERENCE


def test_defaults_use_every_core_for_a_small_folder(image_dir, tmp_path):
    write_images(image_dir, 2)
    cores = len(os.sched_getaffinity(0))
    assert machine_cores() == cores
    # one shard: its task gets every core (1 worker) ...
    assert default_threads(1, 1) == cores and default_threads(2, 1) == cores
    # ... and with as many shards running at once as cores, one thread each
    assert default_threads(cores, 10) == 1 and default_threads(0, 10) == cores
    result = extract_regions(image_dir, tmp_path / "f", model="tv-frcnn-mbv3-320", random_weights=0,
                             quiet=True, workers=0)
    assert result.manifest["devices"]["threads_per_task"] == [cores]


def test_build_splits_takes_captions_from_a_tar_features_index(image_dir, tmp_path):
    from teranprep.pipeline.splits import build_splits
    keys = write_images(image_dir, 6)
    mapping = write_webdataset(image_dir, keys, tmp_path / "wds")
    features = tmp_path / "features"
    extract_regions(str(tmp_path / "wds" / "*.tar"), features, workers=0, **FAST)
    result = build_splits(features / "index.parquet", features=features, out=tmp_path / "splits",
                          val=1, test=1)
    frames = pd.concat([pd.read_parquet(tmp_path / "splits" / f"{s}.parquet") for s in ("train", "val", "test")])
    assert sorted(frames["image_key"]) == sorted(mapping)
    # the caption each image got is the .txt of its own sample
    for key, raw in zip(frames["image_key"], frames["raw"]):
        assert raw == f"a caption of {mapping[key]}"
    assert result.manifest["parameters"]["format"] == "features-index"
