"""Inputs and features/ at s3:// URLs, against a real S3 API (moto's server on 127.0.0.1) through
the real s3fs / botocore client: the same features as on local disk, resume after SIGKILL, a
cluster whose workers share no folder, the later stages reading the bucket, verify, errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import write_images
from s3_fixtures import s3, s3_server  # noqa: F401 - fixtures
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.manifests import FeatureStore, remote
from teranprep.pipeline.extract import extract_regions
from teranprep.pipeline.verify import verify
from test_extract import all_arrays, assert_same_arrays
from test_extract_inputs import FAST, write_webdataset

TIMING_FIELDS = ("created", "timings", "storage")


def _without(data: bytes, fields=TIMING_FIELDS) -> dict:
    doc = json.loads(data)
    for name in fields:
        doc.pop(name, None)
    return doc


def test_tars_and_an_image_prefix_in_the_bucket_give_the_local_features(s3, image_dir, tmp_path):
    keys = write_images(image_dir, 5)
    mapping = write_webdataset(image_dir, keys, tmp_path / "wds")
    tars_url = s3.upload(tmp_path / "wds", "shards")
    images_url = s3.upload(image_dir, "images")
    (image_dir.parent / "notes.txt").write_text("x")

    extract_regions(str(tmp_path / "wds" / "{00000..00001}.tar"), tmp_path / "local-tars", workers=0,
                    shard_size=2, **FAST)
    out = s3.url("features-tars")
    result = extract_regions(f"{tars_url}/{{00000..00001}}.tar", out, workers=0, shard_size=2, **FAST)
    assert result.n_ok == 5 and str(result.out) == out
    # the bucket holds the folder's objects under the same names, and no local path stands in
    names = set(s3.objects("features-tars"))
    assert {"manifest.json", "index.parquet", "shards/plan.json", "shards/regions-00000.h5",
            "shards/regions-00002.json"} <= names
    assert_same_arrays(all_arrays(out), all_arrays(tmp_path / "local-tars"))  # read through the cache
    remote_index = pd.read_parquet(remote.localize_features(out) / "index.parquet")
    local_index = pd.read_parquet(tmp_path / "local-tars" / "index.parquet")
    columns = ["image_key", "status", "caption", "metadata", "num_boxes", "file_size", "file_sha256"]
    assert remote_index[columns].equals(local_index[columns])
    manifest = json.loads(s3.objects("features-tars")["manifest.json"])
    # lineage: the tars by URL with size and ETag, the shard objects' ETags, where it lives
    tar_objects = manifest["input"]["objects"]
    assert sorted(tar_objects) == [f"{tars_url}/00000.tar", f"{tars_url}/00001.tar"]
    assert tar_objects[f"{tars_url}/00000.tar"]["size"] == (tmp_path / "wds" / "00000.tar").stat().st_size
    assert all(e["etag"] for e in manifest["shards"]) and manifest["storage"]["url"] == out
    assert verify(out).ok, verify(out).problems

    # an image prefix is listed like a folder: keys relative to it, the same features
    extract_regions(image_dir, tmp_path / "local-folder", workers=0, shard_size=2, **FAST)
    out2 = s3.url("features-prefix")
    extract_regions(images_url + "/", out2, workers=0, shard_size=2, **FAST)
    assert_same_arrays(all_arrays(out2), all_arrays(tmp_path / "local-folder"))
    assert set(all_arrays(out2)) == set(keys)

    # a CSV list of URLs, itself in the bucket
    listing = pd.DataFrame({"path": [f"{images_url}/{k}" for k in keys], "key": keys})
    s3.fs.pipe_file(f"{s3.name}/lists/images.csv", listing.to_csv(index=False).encode())
    out3 = tmp_path / "from-list"
    extract_regions(s3.url("lists/images.csv"), out3, workers=0, shard_size=2, **FAST)
    assert_same_arrays(all_arrays(out3), all_arrays(tmp_path / "local-folder"))

    # a finished folder at a URL is a no-op: no object rewritten
    before = s3.objects("features-tars")
    again = extract_regions(f"{tars_url}/{{00000..00001}}.tar", out, workers=0, shard_size=2, **FAST)
    assert again.shards_run == 0 and s3.objects("features-tars") == before
    lines = []  # a dry run names the URL and each shard's state, and writes nothing
    extract_regions(f"{tars_url}/{{00000..00001}}.tar", out, workers=0, shard_size=2, dry_run=True,
                    echo=lines.append, **{k: v for k, v in FAST.items() if k != "quiet"})
    assert f"in {out}/shards; 3 complete, 0 to run" in lines[0] and s3.objects("features-tars") == before


def _cli(source, out, *extra):
    return [sys.executable, "-m", "teranprep", "extract-regions", str(source), str(out),
            "--model", "tv-frcnn-mbv3-320", "--random-weights", "0", "--shard-size", "2",
            "--batch-size", "1", "--threads-per-worker", "1", "--quiet", *extra]


def test_driver_killed_mid_run_then_resumed_leaves_the_objects_of_an_uninterrupted_run(s3, image_dir, tmp_path):
    keys = write_images(image_dir, 9)
    write_webdataset(image_dir, keys, tmp_path / "wds", per_tar=4)
    source = s3.upload(tmp_path / "wds", "wds") + "/{00000..00002}.tar"
    env = {**os.environ, **s3.env}
    extract_regions(source, s3.url("reference"), workers=0, shard_size=2, **FAST)  # uninterrupted
    out = s3.url("killed")
    proc = subprocess.Popen(_cli(source, out, "--workers", "1"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not [n for n in s3.names("killed") if n.startswith("shards/regions-")
                                          and n.endswith(".json")]:
        time.sleep(0.1)
    time.sleep(random.Random(5).uniform(0.0, 1.0))  # somewhere inside the next shards
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its dask worker, mid-upload or not
    proc.wait()
    markers = [n for n in s3.names("killed") if n.endswith(".json") and n.startswith("shards/regions-")]
    assert 1 <= len(markers) < 5, "the kill should land after the first shard and before the end"
    assert "manifest.json" not in s3.names("killed")
    done = subprocess.run(_cli(source, out, "--workers", "1"), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    got, want = s3.objects("killed"), s3.objects("reference")
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith(".h5") or name.endswith(".parquet") or name.endswith("plan.json"):
            assert got[name] == want[name], name  # byte for byte
        else:  # manifest and markers: equal but for the run's clock, its own URL and the
            # options as given (the reference ran in-process, --workers 0)
            drop = TIMING_FIELDS + ("object", "options")
            assert _without(got[name], drop) == _without(want[name], drop), name
    assert not s3.fs.exists(f"{s3.name}/killed/.prep-lock.json")  # the resumed run released it
    assert verify(out).ok


def test_what_a_worker_dying_mid_upload_leaves_is_not_trusted(s3, image_dir, tmp_path):
    """The states a dead worker can leave: a shard object without its marker (died before the
    marker), and a marker whose shard object is not the one it describes (an old or cut object).
    A re-run recomputes exactly those shards, to the same bytes."""
    write_images(image_dir, 6)
    source = s3.upload(image_dir, "images")
    out = s3.url("features")
    extract_regions(source, out, workers=0, shard_size=2, **FAST)
    complete = s3.objects("features")
    s3.fs.rm_file(f"{s3.name}/features/manifest.json")
    s3.fs.rm_file(f"{s3.name}/features/shards/regions-00000.json")  # shard uploaded, marker not
    cut = complete["shards/regions-00001.h5"]
    s3.fs.pipe_file(f"{s3.name}/features/shards/regions-00001.h5", cut[: len(cut) // 2])
    again = extract_regions(source, out, workers=0, shard_size=2, **FAST)
    assert again.shards_run == 2
    now = s3.objects("features")
    for name in ("shards/regions-00000.h5", "shards/regions-00001.h5", "shards/regions-00002.h5",
                 "index.parquet"):
        assert now[name] == complete[name], name
    assert verify(out).ok


def test_a_cluster_whose_workers_share_no_folder_writes_the_same_features(s3, image_dir, tmp_path):
    """A scheduler and two `dask worker`s, each started in a folder of its own with its own TMPDIR
    and cache; the workers get no storage options from their environment (only credentials), so
    the endpoint reaches them inside the tasks. Inputs, weights and outputs are URLs."""
    import torch
    from teranprep.extractors.butd.config import get_config
    from test_butd_checkpoints import random_state
    keys = write_images(image_dir, 6)
    write_webdataset(image_dir, keys, tmp_path / "wds", per_tar=3)
    source = s3.upload(tmp_path / "wds", "wds") + "/{00000..00001}.tar"
    weights = tmp_path / "bua-tiny.pth"
    torch.save({"model": random_state(get_config("butd-tiny"))}, weights)
    s3.fs.put_file(str(weights), f"{s3.name}/weights/bua-tiny.pth")
    settings = dict(model="butd-tiny", batch_size=1, quiet=True, shard_size=2)
    extract_regions(str(tmp_path / "wds" / "{00000..00001}.tar"), tmp_path / "local", workers=0,
                    weights=str(weights), threads_per_worker=1, **settings)
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TERANPREP_")}
    base_env.update({k: v for k, v in s3.env.items() if k.startswith("AWS_")})
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                              env=base_env, cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    homes = []
    try:
        deadline = time.time() + 60
        while not scheduler_file.is_file() and time.time() < deadline:
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(2):
            home = tmp_path / f"worker{i}"
            (home / "tmp").mkdir(parents=True)
            homes.append(home)
            env = {**base_env, "TMPDIR": str(home / "tmp"), "TERANPREP_CACHE_DIR": str(home / "cache"),
                   "HOME": str(home)}
            procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--local-directory", str(home / "dask")], env=env, cwd=home,
                                          start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=120)
        out = s3.url("features")
        result = extract_regions(source, out, scheduler=address, weights=s3.url("weights/bua-tiny.pth"),
                                 **settings)
        assert result.n_ok == 6 and result.shards_run == 3
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # no shard passed through the driver's disk (its cache holds the fetched weights only), and
    # its mirror of the folder's small files is gone with the run
    assert not list(Path(s3.env["TERANPREP_CACHE_DIR"]).rglob("*.h5"))
    assert not (Path(s3.env["TERANPREP_CACHE_DIR"]) / "out").exists() or \
        not list((Path(s3.env["TERANPREP_CACHE_DIR"]) / "out").iterdir())
    assert_same_arrays(all_arrays(out), all_arrays(tmp_path / "local"))
    markers = [k for k in s3.objects("features") if k.startswith("shards/regions-") and k.endswith(".json")]
    assert len(markers) == 3
    # the workers' temp folders hold no shard afterwards; the weights came to the workers by URL
    copies = []
    for home in homes:
        assert not [p for p in (home / "tmp").rglob("*") if p.is_file() and p.suffix == ".h5"]
        copies += list((home / "cache").rglob("bua-tiny.pth"))
    assert copies and all(c.read_bytes() == weights.read_bytes() for c in copies)


def test_build_splits_train_eval_index_and_search_read_and_write_the_bucket(s3, tmp_path):
    """Three runs of the same stages: all on disk; features and captions read from the bucket;
    and every folder (splits/, the run, its eval, index/) written to the bucket too. Same splits,
    metrics, index arrays and search answers; the bucket's lineage names URLs, never a cache."""
    import h5py
    import yaml
    from teran_fixtures import make_tiny_bert, planted_dataset, tiny_config, write_tiny_tokenizer
    splits_local, features, _ = planted_dataset(tmp_path / "data", n_train=24, n_test=8)
    features_url = s3.upload(features, "features")
    captions = pd.concat([pd.read_parquet(splits_local / f"{n}.parquet").assign(split=n)
                          for n in ("train", "test")])
    rows = pd.DataFrame({"image": captions["image_key"],
                         "caption": [" ".join(f"w{i}" for i in ids[1:-2]) for ids in captions["input_ids"]]})
    rows = rows.drop_duplicates().reset_index(drop=True)
    s3.fs.pipe_file(f"{s3.name}/captions.csv", rows.to_csv(index=False).encode())
    rows.to_csv(tmp_path / "captions.csv", index=False)
    tok = write_tiny_tokenizer(tmp_path / "tok")
    bert = make_tiny_bert(tmp_path / "bert", vocab_size=40, hidden=16, layers=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(bert, batch_size=4, epochs=1, val_every=1000)))
    options = ["--storage-options", json.dumps({"endpoint_url": s3.endpoint})]
    cache = ["--cache-dir", str(tmp_path / "reader-cache"), "--cache-gb", "1"]
    runner = CliRunner()

    def prep(*argv):
        result = runner.invoke(main, [str(a) for a in argv])
        assert result.exit_code == 0, result.output
        return result.output

    folders, answers = {}, {}
    for where, feats, caps in (("local", features, tmp_path / "captions.csv"),
                               ("reads", features_url, s3.url("captions.csv")),
                               ("bucket", features_url, s3.url("captions.csv"))):
        root = s3.url("out") if where == "bucket" else str(tmp_path / where)
        splits, run, index = f"{root}/splits", f"{root}/run", f"{root}/index"
        prep("build-splits", caps, "--features", feats, "--out", splits, "--tokenizer", tok,
             "--max-tokens", 16, "--val", 4, "--test", 4, *options, *cache)
        prep("train", splits, "--config", config, "--out", run, "--stop-after", 3,
             "--device", "cpu", *options, *cache)
        prep("eval", run, "--splits", splits, "--device", "cpu", *options, *cache)  # into RUN/eval-test-all
        prep("index", run, "--features", feats, "--out", index, *options, *cache)
        answers[where] = json.loads(prep("search", index, "w3 w5 w7", "-k", 5, "--json", *options, *cache))
        if where == "bucket":
            # a stage whose default OUT lies in its run (train-shortlist: RUN/shortlist) writes it
            # beside the run at the URL, not into the run's cached copy
            said = prep("train-shortlist", run, "--epochs", 1, "--dim", 8, "--batch-size", 4, *options, *cache)
            assert f"{run}/shortlist" in said, said
            assert "shortlist/manifest.json" in s3.names("out/run") and "shortlist/head.pt" in s3.names("out/run")
            for folder in (splits, run, index):
                prep("verify", folder, *options)
            local = tmp_path / "bucket"
            for folder in ("splits", "run", "index"):
                s3.fs.get(f"{s3.name}/out/{folder}/", str(local / folder), recursive=True)
            root = local
        folders[where] = Path(root)
    assert not any(name.endswith(remote.LOCK_NAME) for name in s3.names("out"))  # every lock given back
    assert not any(remote.REMOTE_MARK in name or ".teranprep-lock" in name for name in s3.names("out"))
    for where in ("reads", "bucket"):
        manifest = json.loads((folders[where] / "splits" / "manifest.json").read_text())
        assert manifest["features"]["path"] == features_url  # lineage names the URL, not the cache
        assert manifest["captions"]["path"] == s3.url("captions.csv")
    index_lineage = json.loads((folders["bucket"] / "index" / "manifest.json").read_text())["lineage"]
    assert index_lineage["checkpoint"].startswith(s3.url("out/run/"))
    assert index_lineage["features"] == features_url
    assert str(tmp_path) not in json.dumps(index_lineage)  # no cache or mirror path recorded
    for where in ("reads", "bucket"):
        for name in ("train", "val", "test"):
            a = pd.read_parquet(folders["local"] / "splits" / f"{name}.parquet")
            b = pd.read_parquet(folders[where] / "splits" / f"{name}.parquet")
            assert a.equals(b), (where, name)
        metrics = [json.loads((folders[w] / "run" / "eval-test-all" / "metrics.json").read_text())
                   for w in ("local", where)]
        for name in ("i2t", "t2i", "rsum", "n_images", "n_captions"):
            assert metrics[0][name] == metrics[1][name], (where, name)
        # the index's embeddings (its attributes name each run's own checkpoint sha256)
        with h5py.File(folders["local"] / "index" / "shards/regions-00000.h5") as a, \
                h5py.File(folders[where] / "index" / "shards/regions-00000.h5") as b:
            assert sorted(a) == sorted(b) and "features" in a
            for name in a:
                assert np.array_equal(a[name][()], b[name][()]), name
        ranked = [[(h["key"], h["score"]) for h in answers[w]["results"]] for w in ("local", where)]
        assert len(ranked[0]) == 5 and ranked[0] == ranked[1], where
    assert list((tmp_path / "reader-cache").glob("features/*/shards/*.h5"))  # shards came through the cache


def test_a_run_at_a_url_interrupted_by_sigint_uploads_its_checkpoint_and_resumes(s3, tmp_path, make_features):
    """Ctrl-C of `prep train --out s3://...`: one line saying what was kept and how to resume, the
    checkpoint the stage kept is in the bucket, the lock object is gone, and --resume continues
    from it (splits read from the bucket too)."""
    import yaml
    from teran_fixtures import make_tiny_bert, random_dataset, tiny_config
    from teranprep.pipeline.train import load_checkpoint
    splits, features = random_dataset(tmp_path, make_features)
    s3.upload(features, "features")
    manifest = json.loads((splits / "manifest.json").read_text())
    manifest["features"]["path"] = s3.url("features")  # the uploaded splits name the uploaded features
    (splits / "manifest.json").write_text(json.dumps(manifest))
    splits_url = s3.upload(splits, "splits")
    bert = make_tiny_bert(tmp_path / "bert")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(bert, epochs=400, val_every=100000, checkpoint_every=0)))
    env = {**os.environ, **s3.env, "OMP_NUM_THREADS": "1"}
    run = s3.url("run")
    cmd = [sys.executable, "-m", "teranprep", "train", splits_url, "--config", str(config), "--out", run]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    mirrors = Path(s3.env["TERANPREP_CACHE_DIR"]) / "out"

    def steps_logged():  # the run's local mirror (the stage writes there, then uploads)
        return any(p.read_text().count('"train"') >= 3 for p in mirrors.glob("*/metrics.jsonl"))

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not steps_logged():
        time.sleep(0.2)
    assert steps_logged(), "training never started"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stdout + stderr
    lines = [x for x in stderr.splitlines() if x.strip() and not x.startswith("WARNING:")]
    assert len(lines) == 1 and "resume with: prep train" in lines[0], stderr
    assert f"{run}/checkpoint_last.pt" in lines[0] and str(mirrors) not in lines[0]  # the URL, not the mirror
    names = s3.names("run")
    assert "checkpoint_last.pt" in names and remote.LOCK_NAME not in names, names
    assert not list(mirrors.glob("*")), "the private mirror is removed once uploaded"
    kept = tmp_path / "kept.pt"
    s3.fs.get_file(f"{s3.name}/run/checkpoint_last.pt", str(kept))
    step = int(load_checkpoint(kept)["step"])
    assert step >= 3
    resumed = subprocess.run([sys.executable, "-m", "teranprep", "train", splits_url, "--out", run,
                              "--resume", "--stop-after", str(step + 2)], env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    s3.fs.get_file(f"{s3.name}/run/checkpoint_last.pt", str(kept))
    assert int(load_checkpoint(kept)["step"]) == step + 2


def test_the_shard_cache_keeps_within_its_limit_and_reads_the_same_values(s3, make_features, tmp_path, monkeypatch):
    keys = [f"img{i:02d}.jpg" for i in range(12)]
    local, _ = make_features(keys, n_boxes=4, dim=64, shard_size=3)
    url = s3.upload(local, "features")
    shard_bytes = max(p.stat().st_size for p in (local / "shards").glob("*.h5"))
    monkeypatch.setenv(remote.CACHE_GB_ENV, repr(1.5 * shard_bytes / (1 << 30)))  # room for one shard
    with FeatureStore(local) as a, FeatureStore(url) as b:
        for key in keys:
            assert np.array_equal(a[key].features, b[key].features) and np.array_equal(a[key].boxes, b[key].boxes)
            cached = list(Path(os.environ["TERANPREP_CACHE_DIR"]).glob("features/*/shards/*.h5"))
            assert len(cached) == 1  # the least recently used shard went
    # the folder at the URL rewritten (other values, same names): a new process reads the new ones,
    # never a cached shard of the old manifest
    other, _ = make_features(keys, n_boxes=4, dim=64, shard_size=3, seed=1, name="other")
    s3.upload(other, "features")
    remote._localized.clear()
    with FeatureStore(other) as a, FeatureStore(url) as b:
        assert all(np.array_equal(a[k].features, b[k].features) for k in keys)
    # a shard object damaged in the bucket is refused on fetch, by the manifest's sha256
    for path in Path(os.environ["TERANPREP_CACHE_DIR"]).glob("features/*/shards/*.h5"):
        path.unlink()
    name = f"{s3.name}/features/shards/regions-00000.h5"
    data = bytearray(s3.fs.cat_file(name))
    data[-100] ^= 0xFF
    s3.fs.pipe_file(name, bytes(data))
    with FeatureStore(url) as b, pytest.raises(PrepError, match="sha256 differs"):
        b[keys[0]]


def test_verify_on_a_bucket_catches_a_damaged_and_a_missing_object(s3, make_features):
    keys = [f"img{i:02d}.jpg" for i in range(6)]
    local, _ = make_features(keys, n_boxes=3, dim=8, shard_size=2)
    url = s3.upload(local, "features")
    assert verify(url).ok, verify(url).problems
    name = f"{s3.name}/features/shards/regions-00001.h5"
    data = bytearray(s3.fs.cat_file(name))
    data[len(data) // 2] ^= 0xFF
    s3.fs.pipe_file(name, bytes(data))
    s3.fs.rm_file(f"{s3.name}/features/shards/regions-00002.h5")
    report = verify(url)
    assert any(p.startswith(f"{url}/shards/regions-00001.h5") and "sha256" in p for p in report.problems), report.problems
    assert any(p.startswith(f"{url}/shards/regions-00002.h5") and "missing" in p for p in report.problems), report.problems
    result = CliRunner().invoke(main, ["verify", url])
    assert result.exit_code == 1 and f"problem: {url}/shards/regions-00002.h5" in result.output


def _one_error_line(argv, env):
    proc = subprocess.run([sys.executable, "-m", "teranprep", *argv], env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_a_bad_endpoint_or_missing_credentials_is_one_error_line(s3, tmp_path):
    s3.fs.pipe_file(f"{s3.name}/images/a.jpg", b"x")
    env = {**os.environ, **s3.env}
    dead = json.dumps({"endpoint_url": "http://127.0.0.1:9"})  # the discard port: nothing listens
    line = _one_error_line(["extract-regions", s3.url("images/"), str(tmp_path / "out"), "--random-weights",
                            "0", "--storage-options", dead], env)
    assert s3.url("images") in line and "endpoint" in line
    line = _one_error_line(["verify", s3.url("features"), "--storage-options", dead], env)
    assert "endpoint" in line
    bare = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    line = _one_error_line(["extract-regions", s3.url("images/"), str(tmp_path / "out"), "--random-weights",
                            "0"], bare)
    assert "credentials" in line
    line = _one_error_line(["build-splits", s3.url("captions.csv"), "--features", s3.url("features"),
                            "--out", str(tmp_path / "splits")], env)
    assert "captions file not found" in line
    # a stage writing to a URL that fails: one line, and the lock object given back
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,a cat\n")
    line = _one_error_line(["build-splits", str(tmp_path / "c.csv"), "--features", s3.url("features"),
                            "--out", s3.url("splits")], env)
    assert "no features manifest at this URL" in line
    assert remote.LOCK_NAME not in s3.names("splits")


def test_weights_at_a_url_are_fetched_checked_and_give_the_local_weights_features(s3, image_dir, tmp_path):
    import torch
    from teranprep.extractors.butd.config import get_config
    from teranprep.manifests import sha256_file
    from test_butd_checkpoints import random_state
    write_images(image_dir, 3)
    path = tmp_path / "bua-tiny.pth"
    torch.save({"model": random_state(get_config("butd-tiny"))}, path)
    s3.fs.put_file(str(path), f"{s3.name}/weights/bua-tiny.pth")
    settings = dict(model="butd-tiny", batch_size=1, quiet=True, threads_per_worker=1, workers=0)
    extract_regions(image_dir, tmp_path / "local", weights=str(path), **settings)
    result = extract_regions(image_dir, tmp_path / "remote", weights=s3.url("weights/bua-tiny.pth"), **settings)
    assert result.manifest["detector"]["weights_sha256"] == sha256_file(path)
    assert_same_arrays(all_arrays(tmp_path / "remote"), all_arrays(tmp_path / "local"))
    # a worker whose copy hashes differently from the planned sha256 refuses to run
    from dataclasses import replace
    from teranprep.pipeline.extract import ExtractTask, _with_local_weights
    from teranprep.extractors.base import DetectorSpec
    task = ExtractTask(index=0, out=str(tmp_path / "x"), params_fingerprint="p", weights_sha256="0" * 64,
                       spec=DetectorSpec(model="butd-tiny", weights=s3.url("weights/bua-tiny.pth")))
    with pytest.raises(PrepError, match="planned with 000000000000"):
        _with_local_weights(task)
    local = _with_local_weights(replace(task, weights_sha256=sha256_file(path)))
    assert Path(local.spec.weights).read_bytes() == path.read_bytes()


def test_one_writer_per_folder_at_a_url_through_its_lock_object(s3, image_dir, tmp_path):
    import socket
    write_images(image_dir, 2)
    out = s3.url("features")
    lock = f"{s3.name}/features/.prep-lock.json"
    for holder in ({"host": socket.gethostname(), "pid": os.getppid()},  # alive, on this host
                   {"host": "another-machine", "pid": 1}):  # cannot be checked from here
        s3.fs.pipe_file(lock, json.dumps(holder).encode())
        with pytest.raises(PrepError, match="another run writes here"):
            extract_regions(image_dir, out, workers=0, **FAST)
        assert "manifest.json" not in s3.objects("features")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    s3.fs.pipe_file(lock, json.dumps({"host": socket.gethostname(), "pid": int(dead)}).encode())
    result = extract_regions(image_dir, out, workers=0, **FAST)  # a killed run's lock is taken over
    assert result.n_ok == 2 and not s3.fs.exists(lock)


def test_another_fsspec_backend_memory_urls_give_the_local_features_and_splits(image_dir, tmp_path, monkeypatch):
    """Nothing in the URL code is S3's: fsspec's in-memory filesystem (memory://), a backend with
    no ETags and no endpoint, carries images in, features and splits out, and verify, through the
    same stages (in this process: memory:// lives in it)."""
    import fsspec
    monkeypatch.setenv("TERANPREP_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/prep-{tmp_path.name}"
    try:
        keys = write_images(image_dir, 4)
        for path in sorted(image_dir.rglob("*")):
            if path.is_file():
                fs.pipe_file(f"{root}/images/{path.relative_to(image_dir).as_posix()}", path.read_bytes())
        extract_regions(image_dir, tmp_path / "local", workers=0, shard_size=3, **FAST)
        result = extract_regions(f"memory://{root}/images/", f"memory://{root}/features", workers=0,
                                 shard_size=3, **FAST)
        assert result.n_ok == 4
        assert_same_arrays(all_arrays(f"memory://{root}/features"), all_arrays(tmp_path / "local"))
        assert verify(f"memory://{root}/features").ok
        captions = pd.DataFrame({"image": sorted(keys) * 2, "caption": [f"a photo number {i}" for i in range(8)]})
        fs.pipe_file(f"{root}/captions.csv", captions.to_csv(index=False).encode())
        captions.to_csv(tmp_path / "captions.csv", index=False)
        runner = CliRunner()
        for caps, feats, out in ((tmp_path / "captions.csv", tmp_path / "local", tmp_path / "splits"),
                                 (f"memory://{root}/captions.csv", f"memory://{root}/features",
                                  f"memory://{root}/splits")):
            done = runner.invoke(main, ["build-splits", str(caps), "--features", str(feats), "--out", str(out),
                                        "--val", "1", "--test", "1", "--quiet"])
            assert done.exit_code == 0, done.output
        assert fs.exists(f"{root}/splits/manifest.json") and not fs.exists(f"{root}/splits/{remote.LOCK_NAME}")
        for name in ("train", "val", "test"):
            a = pd.read_parquet(tmp_path / "splits" / f"{name}.parquet")
            b = pd.read_parquet(__import__("io").BytesIO(fs.cat_file(f"{root}/splits/{name}.parquet")))
            assert a.equals(b), name
        assert verify(f"memory://{root}/splits").ok
        for feats, out in ((tmp_path / "local", tmp_path / "export"),
                           (f"memory://{root}/features", f"memory://{root}/export")):
            done = runner.invoke(main, ["export-features", str(feats), "--to", "butd-tsv", str(out),
                                        "--quiet"])
            assert done.exit_code == 0, done.output
        tsv = [p.relative_to(tmp_path / "export").as_posix() for p in (tmp_path / "export").rglob("*.tsv")]
        assert tsv and all(fs.cat_file(f"{root}/export/{name}") == (tmp_path / "export" / name).read_bytes()
                           for name in tsv)
        record = [p for p in fs.find(f"{root}/export") if p.endswith(".json") and "teranprep" not in p]
        assert record and json.loads(fs.cat_file(record[0]))["features"] == remote.url_of(f"memory://{root}/features")
        fs.rm_file(f"{root}/splits/test.parquet")
        assert not verify(f"memory://{root}/splits").ok  # a missing object is caught here too
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_a_stage_that_writes_only_locally_refuses_a_url_out_in_one_line(s3, tmp_path):
    result = CliRunner().invoke(main, ["make-synthetic", s3.url("synthetic")])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert lines == [f"error: {s3.url('synthetic')}: this stage writes to a local folder only; pass a "
                     "local path and copy the result up"]
    assert s3.names("synthetic") == []


def test_an_index_at_a_url_refuses_a_remote_scheduler_before_connecting(s3, tmp_path):
    """index writes a URL OUT through this machine's mirror: a scheduler's workers (other
    machines) could not reach it, so `--scheduler` with a URL OUT is refused in one line, before
    the scheduler is contacted (nothing listens at this address), leaving no object behind."""
    result = CliRunner().invoke(main, ["index", str(tmp_path / "run"), "--features", str(tmp_path / "f"),
                                       "--out", s3.url("index"), "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {s3.url('index')}: an index at a URL"), lines
    assert s3.names("index") == []
