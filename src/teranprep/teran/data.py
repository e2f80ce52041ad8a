"""Training and evaluation data: split rows + regions read through FeatureStore, padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import PrepError
from ..manifests import FeatureStore
from ..manifests.splits import check_lineage, read_split


@dataclass
class SplitData:
    """One split's captions, in file order, and the image keys in order of first appearance."""

    name: str
    captions: pd.DataFrame          # image_key, caption_id, input_ids (+ raw)
    image_keys: list[str]
    caption_image: np.ndarray       # (n_captions,) index into image_keys


def load_split(splits_dir: Path, name: str, store: FeatureStore, max_images: int | None = None) -> SplitData:
    frame = read_split(splits_dir, name, columns=("image_key", "caption_id", "raw", "input_ids"))
    missing = sorted(set(frame["image_key"]) - set(store.keys()))
    if missing:
        raise PrepError(f"{Path(splits_dir) / (name + '.parquet')}: {len(missing)} image(s) have no ok "
                        f"features in {store.root} (first: {missing[0]!r}); re-run build-splits")
    keys = list(dict.fromkeys(frame["image_key"]))
    sizes = store.index.set_index("image_key").loc[keys, ["width", "height"]]
    unknown = sizes.index[(sizes["width"] <= 0) | (sizes["height"] <= 0)]
    if len(unknown):  # TERAN's box vector divides by the image size: refuse rather than guess
        raise PrepError(f"{store.root / 'index.parquet'}: {len(unknown)} image(s) of split {name!r} "
                        f"have no known width/height (first: {unknown[0]!r}); re-import the "
                        "features with their image sizes (import-features --sizes)")
    if max_images is not None and len(keys) > max_images:
        keys = keys[:max_images]
        frame = frame[frame["image_key"].isin(set(keys))]
    frame = frame.reset_index(drop=True)
    position = {k: i for i, k in enumerate(keys)}
    caption_image = frame["image_key"].map(position).to_numpy(np.int64)
    return SplitData(name, frame, keys, caption_image)


def open_features(splits_dir: Path, features: Path | None = None) -> FeatureStore:
    """The features of these splits, after checking splits/manifest.json's lineage and that the
    features manifest's claims (feature_dim, dtype) hold for its first shard."""
    from ..manifests.claims import refuse_false_claims
    store = FeatureStore(check_lineage(Path(splits_dir), features))
    refuse_false_claims(store)
    return store


def _image_items(store: FeatureStore, keys: list[str], max_regions: int | None) -> list[dict]:
    """Features (as stored: float16 stays float16 until collate) and boxes of `keys`, read in
    one get_many: shard by shard, in row order, only the first max_regions rows."""
    arrays = store.get_many(keys, names=("features", "boxes"), max_rows=max_regions)
    return [{"features": feats, "boxes": boxes, "size": store.image_size(key)}
            for key, (feats, boxes) in zip(keys, arrays)]


class PairDataset(Dataset):
    """Item i: caption i of the split and its image's regions (a training pair).

    `__getitems__` is what a DataLoader calls for a whole batch: one bulk read for it."""

    def __init__(self, split: SplitData, store: FeatureStore, max_regions: int | None = None):
        self.keys = split.captions["image_key"].tolist()
        self.ids = [np.asarray(x, dtype=np.int64) for x in split.captions["input_ids"]]
        self.store, self.max_regions = store, max_regions

    def __len__(self):
        return len(self.ids)

    def __getitems__(self, indices):
        items = _image_items(self.store, [self.keys[i] for i in indices], self.max_regions)
        for item, i in zip(items, indices):
            item.update(input_ids=self.ids[i], index=i)
        return items

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


class ImageDataset(Dataset):
    def __init__(self, keys: list[str], store: FeatureStore, max_regions: int | None = None):
        self.keys, self.store, self.max_regions = keys, store, max_regions

    def __len__(self):
        return len(self.keys)

    def __getitems__(self, indices):
        items = _image_items(self.store, [self.keys[i] for i in indices], self.max_regions)
        for item, i in zip(items, indices):
            item["index"] = i
        return items

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


class CaptionDataset(Dataset):
    def __init__(self, input_ids):
        self.ids = [np.asarray(x, dtype=np.int64) for x in input_ids]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "index": i}


def collate(items: list[dict]) -> dict:
    """Pads regions behind a zero slot 0 (zero feature, zero box) and word ids with 0."""
    out = {"index": torch.tensor([it["index"] for it in items])}
    if "features" in items[0]:
        n = [len(it["features"]) for it in items]
        r = max(max(n), 1) + 1  # at least one region column, even for images without boxes
        dim = items[0]["features"].shape[1]
        feats = torch.zeros(len(items), r, dim)
        boxes = torch.zeros(len(items), r, 4)
        for b, it in enumerate(items):
            feats[b, 1:n[b] + 1] = torch.from_numpy(it["features"])
            boxes[b, 1:n[b] + 1] = torch.from_numpy(it["boxes"])
        out.update(features=feats, boxes=boxes,
                   sizes=torch.tensor([it["size"] for it in items], dtype=torch.float32),
                   region_lengths=torch.tensor([k + 1 for k in n]))
    if "input_ids" in items[0]:
        lengths = [len(it["input_ids"]) for it in items]
        ids = torch.zeros(len(items), max(lengths), dtype=torch.long)
        for b, it in enumerate(items):
            ids[b, :lengths[b]] = torch.from_numpy(it["input_ids"])
        out.update(input_ids=ids, word_lengths=torch.tensor(lengths))
    return out


class EpochBatchSampler(Sampler):
    """Batches of one epoch: a permutation drawn from (seed, epoch) alone, so a resumed run sees
    the same batches; incomplete last batches are dropped; rank r of `world` takes the r-th slice
    of every global batch of batch_size * world items."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        if self.steps_per_epoch() == 0:
            raise PrepError(f"training split has {n} captions, fewer than one batch of "
                            f"{batch_size * world}; lower training.batch_size")

    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self):
        return self.steps_per_epoch() - self.start

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        global_batch = self.batch_size * self.world
        for step in range(self.start, self.steps_per_epoch()):
            chunk = order[step * global_batch:(step + 1) * global_batch]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()


def make_loader(dataset: Dataset, *, batch_size: int | None = None, batch_sampler=None,
                num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False) -> DataLoader:
    # A private generator: creating the iterator must not advance torch's global RNG (dropout
    # draws from it, and resume must replay it exactly).
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(collate_fn=collate, num_workers=num_workers, generator=generator,
                  persistent_workers=False, pin_memory=pin_memory)
    if num_workers:
        kwargs["prefetch_factor"] = prefetch_factor
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, **kwargs)
