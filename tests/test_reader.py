"""The shard reader: raw preadv reads against h5py's own slicing, get_many, old layouts, forks."""

from __future__ import annotations

import multiprocessing
import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from teranprep.manifests import FeatureStore
from teranprep.manifests.features import SHARDS_DIR
from teranprep.manifests.shards import ShardReader

FIELDS = ("features", "boxes", "class_ids", "class_scores")
# 0..150 boxes with shards of 5 images: many images cross a 64-row chunk boundary, some hold
# more than a whole chunk, some none.
N_BOXES = [0, 3, 70, 1, 64, 63, 129, 2, 0, 40, 150, 5, 61, 66, 7, 1, 33]
KEYS = [f"k{i:02d}.jpg" for i in range(len(N_BOXES))]


@pytest.fixture
def store_dir(make_features):
    out, regions = make_features(KEYS, n_boxes=dict(zip(KEYS, N_BOXES)), dim=12, shard_size=5,
                                 dtype="float16")
    return out, regions


def h5py_read(path, row):
    """The independent reading: h5py slicing of every dataset, as the reader did before."""
    with h5py.File(path, "r") as h5:
        lo, hi = (int(v) for v in h5["offsets"][row:row + 2])
        return {name: h5[name][lo:hi] for name in FIELDS}


def assert_same(got, want: dict):
    for name in FIELDS:
        value = getattr(got, name)
        assert value.dtype == want[name].dtype and value.shape == want[name].shape, name
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_raw_reads_equal_h5py_slicing_across_chunk_boundaries(store_dir):
    out, regions = store_dir
    with FeatureStore(out) as store:
        for key in reversed(KEYS):
            shard, row = store._where[key]
            got = store[key]
            assert_same(got, h5py_read(out / shard, row))
            np.testing.assert_array_equal(got.features, regions[key].features.astype(np.float16))
            feats, boxes = store.read_columns(key, ("features", "boxes"), max_rows=4)
            np.testing.assert_array_equal(feats, got.features[:4])
            np.testing.assert_array_equal(boxes, got.boxes[:4])
            np.testing.assert_array_equal(store.features(key), got.features)


def test_get_many_equals_single_reads_across_shards_with_repeats(store_dir):
    out, _ = store_dir
    rng = np.random.default_rng(3)
    keys = [KEYS[i] for i in rng.integers(0, len(KEYS), 60)] + KEYS[2:5] + KEYS[2:5]
    with FeatureStore(out) as store:
        assert len({store._where[k][0] for k in keys}) == 4  # keys from every shard
        many = store.get_many(keys)
        assert [r.image_key for r in many] == keys
        for key, got in zip(keys, many):
            single = store[key]
            for name in FIELDS:
                np.testing.assert_array_equal(getattr(got, name), getattr(single, name))
            assert (got.width, got.height) == (single.width, single.height)
        # A repeated key is its own copy: writing into one result leaves the others alone.
        first, again = many[-6], many[-3]
        assert first.image_key == again.image_key and len(first) == 70
        first.features[:] = 0
        np.testing.assert_array_equal(again.features, store[again.image_key].features)  # was: sum > 0
        pairs = store.get_many(keys, names=("boxes", "features"), max_rows=65)
        for key, (boxes, feats) in zip(keys, pairs):
            np.testing.assert_array_equal(boxes, store[key].boxes[:65])
            np.testing.assert_array_equal(feats, store[key].features[:65])
        assert store.get_many([]) == []
        with pytest.raises(KeyError):
            store.get_many([KEYS[0], "missing.jpg"])


@pytest.mark.parametrize("layout", ["gzip", "contiguous"])
def test_shards_in_other_layouts_read_the_same(store_dir, layout):
    """A compressed shard (other tools) goes through h5py; a contiguous one through its offset."""
    out, _ = store_dir
    with FeatureStore(out) as store:
        want = {k: store[k] for k in KEYS}
    for path in sorted((out / SHARDS_DIR).glob("*.h5")):
        with h5py.File(path, "a") as h5:
            for name in FIELDS:
                data = h5[name][:]
                del h5[name]
                if layout == "gzip":
                    h5.create_dataset(name, data=data, chunks=(16, *data.shape[1:]), compression="gzip")
                else:
                    h5.create_dataset(name, data=data)
    with FeatureStore(out) as store:
        reader = store._reader(store._where[KEYS[2]][0])
        assert all((raw is None) == (layout == "gzip") for raw in reader._raw.values())
        for got in [store[k] for k in KEYS] + store.get_many(KEYS[::-1]):
            for name in FIELDS:
                np.testing.assert_array_equal(getattr(got, name), getattr(want[got.image_key], name))


def _child_sums(store, keys, queue):
    queue.put([float(np.abs(store[k].features.astype(np.float64)).sum()) for k in keys])


def expected_sums(store, keys):
    return [float(np.abs(store[k].features.astype(np.float64)).sum()) for k in keys]


def test_store_used_before_fork_reads_correctly_in_children(store_dir):
    out, _ = store_dir
    store = FeatureStore(out)
    want = expected_sums(store, KEYS)  # every shard open in the parent before the fork
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: read everything, report through the pipe, exit without cleanup
        try:
            got = expected_sums(store, KEYS[::-1])[::-1]
            store.close()
            os.write(write_fd, repr(got).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as fh:
        reported = fh.read()
    os.waitpid(pid, 0)
    assert eval(reported) == want
    # The parent's handles still work after the child closed its copies.
    assert expected_sums(store, KEYS) == want
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child_sums, args=(store, KEYS[i::2], queue)) for i in range(2)]
    for p in procs:
        p.start()
    results = sorted([queue.get(timeout=60) for _ in procs], key=len, reverse=True)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(results[0] + results[1]) == sorted(want)
    store.close()


class _Features(Dataset):
    def __init__(self, store):
        self.store = store

    def __len__(self):
        return len(KEYS)

    def __getitem__(self, i):
        return torch.from_numpy(self.store.features(KEYS[i]).astype(np.float32)).abs().sum().double()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_store_in_dataloader_workers(store_dir, context):
    out, _ = store_dir
    store = FeatureStore(out)
    want = [float(np.abs(store[k].features.astype(np.float32)).sum(dtype=np.float32)) for k in KEYS]
    loader = DataLoader(_Features(store), batch_size=3, num_workers=2, multiprocessing_context=context)
    got = torch.cat(list(loader)).tolist()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert expected_sums(store, KEYS)  # the parent's store still reads
    store.close()


def test_pickled_reader_reopens(store_dir):
    import pickle
    out, _ = store_dir
    path = sorted((out / SHARDS_DIR).glob("*.h5"))[1]
    with ShardReader(path) as reader:
        want = reader.read(2)
        copy = pickle.loads(pickle.dumps(reader))
    got = copy.read(2)
    np.testing.assert_array_equal(got.features, want.features)
    copy.close()
