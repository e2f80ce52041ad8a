"""The index stage: a run + features/ -> index/ (region embeddings, FAISS shortlist, captions).

Every ok image (or one split's) goes once through the run's image encoder; shards of
alignment-space region vectors are written through manifests/ with the features/ rules (atomic
shards, a stats file as completion marker, resume keeps complete shards), one task per shard on
the same executor as extract-regions. The shortlist vectors come from the shards afterwards.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PrepError
from ..manifests.atomic import commit_temp, sha256_file, temp_path_for
from ..manifests.build import write_shard
from ..manifests.features import (MANIFEST_NAME, SHARDS_DIR, completed_shard,
                                  current_manifest, manifest_sha256, prepare_output,
                                  read_features_manifest)
from ..manifests.fingerprint import fingerprint
from ..manifests.index import (CAPTIONS_NAME, HEAD_NAME, SHORTLIST_NAME, refuse_foreign_folder,
                               write_captions, write_index_manifest)
from ..manifests.shards import Regions, remove_stale_temps, shard_name
from ..manifests.splits import run_caption_rule

RANDOM_FEATURES_WARNING = ("the indexed features came from a detector with random weights: "
                           "search results over them are meaningless")
EXACT_MAX = 100_000  # up to this many images the shortlist is an exact inner-product search
IVF_NPROBE = 32
FAISS_SEED = 1234


@dataclass(frozen=True)
class IndexTask:
    index: int
    checkpoint: str
    features: str
    keys: tuple
    out: str
    dtype: str
    batch_size: int
    max_regions: int | None
    params_fingerprint: str
    threads: int

    @property
    def h5_path(self) -> Path:
        return Path(self.out) / SHARDS_DIR / shard_name(self.index)

    def __repr__(self):  # the executor names failed tasks with this
        return f"IndexTask({self.h5_path.name}, {len(self.keys)} images)"


_worker_cache: dict = {}


def _worker_model_and_store(task: IndexTask):
    """One model and one feature store per worker process, reused across its tasks."""
    from ..manifests import FeatureStore
    from .evaluate import load_model
    key = (task.checkpoint, task.features)
    if _worker_cache.get("key") != key:
        model, _ = load_model(Path(task.checkpoint), "cpu")
        _worker_cache.update(key=key, model=model, store=FeatureStore(Path(task.features)))
    return _worker_cache["model"], _worker_cache["store"]


def encode_shard(task: IndexTask) -> dict:
    """Encodes one shard's images and writes their region embeddings; returns the shard stats."""
    import torch
    from ..teran.data import ImageDataset, make_loader
    from .distribute import report_progress, tune_malloc_for_tensors
    tune_malloc_for_tensors()
    model, store = _worker_model_and_store(task)
    before = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        items = []
        loader = make_loader(ImageDataset(list(task.keys), store, task.max_regions),
                             batch_size=task.batch_size)
        with torch.no_grad():
            for batch in loader:
                out = model.encode_images(batch["features"], batch["boxes"], batch["sizes"],
                                          batch["region_lengths"]).float().numpy()
                for b, i in enumerate(batch["index"].tolist()):
                    n = int(batch["region_lengths"][b]) - 1  # slot 0 is never scored: not stored
                    w, h = (int(v) for v in batch["sizes"][b].tolist())
                    items.append(Regions(task.keys[i], w, h, batch["boxes"][b, 1:n + 1].numpy().copy(),
                                         out[b, 1:n + 1].copy()))
                report_progress({"run": task.out, "shard": task.index, "images": len(items)})
    finally:
        torch.set_num_threads(before)
    ckpt_attr = {"detector": "teran-image-encoder", "weights_sha256": ""}
    return write_shard(task.h5_path, items, feature_dim=model.config["model"]["embed_dim"],
                       dtype=task.dtype, attrs=ckpt_attr, columns=(),
                       params_fingerprint=task.params_fingerprint,
                       extra_stats={"keys": list(task.keys)})


# ---------------------------------------------------------------- shortlist (FAISS)

def faiss_plan(n: int, exact_max: int = EXACT_MAX) -> dict:
    """Exact inner product up to `exact_max` images; above, IVF with ~sqrt(n) lists (k-means on
    64 vectors per list: seconds, where 4 sqrt(n) lists took minutes at 1M on 2 cores)."""
    if n <= exact_max:
        return {"type": "flat-ip"}
    nlist = int(2 ** round(np.log2(np.sqrt(n))))
    return {"type": "ivf-flat-ip", "nlist": nlist, "nprobe": IVF_NPROBE,
            "train_size": int(min(n, 64 * nlist)), "seed": FAISS_SEED}


def build_faiss(vectors: np.ndarray, plan: dict):
    import faiss
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    d = vectors.shape[1]
    if plan["type"] == "flat-ip":
        index = faiss.IndexFlatIP(d)
    else:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, plan["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = plan["seed"]
        sample = np.random.default_rng(plan["seed"]).choice(len(vectors), plan["train_size"], replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = plan["nprobe"]
    index.add(vectors)
    return index


def write_faiss(index, path: Path) -> None:
    import faiss
    tmp = temp_path_for(Path(path))
    faiss.write_index(index, str(tmp))
    commit_temp(tmp, Path(path))


def shard_global_vectors(head, embeddings: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n_images, dim) shortlist vectors of one shard's images from its flat region embeddings."""
    import torch
    import torch.nn.functional as F
    tokens = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    with torch.no_grad():
        if head.kind == "mlp":
            tokens = head.image(tokens)
        counts = torch.from_numpy(np.diff(offsets))
        owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
        sums = torch.zeros(len(counts), tokens.shape[1]).index_add_(0, owner, tokens)
        means = sums / counts.clamp(min=1)[:, None].float()
        return F.normalize(means, p=2, dim=-1).numpy()


def load_head(head_dir: Path | None, embed_dim: int):
    """(head, description for the manifest): a trained head from `head_dir`, else mean pooling."""
    from ..extractors.weights import load_torch_file
    from ..teran.shortlist import ShortlistHead
    if head_dir is None:
        return ShortlistHead(embed_dim, kind="mean"), {"kind": "mean", "dim": embed_dim, "sha256": ""}
    path = Path(head_dir) / HEAD_NAME if Path(head_dir).is_dir() else Path(head_dir)
    if not path.is_file():
        raise PrepError(f"{path}: no shortlist head; train one with `prep train-shortlist RUN`")
    payload = load_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != "teranprep.shortlist-head":
        raise PrepError(f"{path}: not a shortlist head written by `prep train-shortlist`")
    head = ShortlistHead.from_payload(payload)
    if head.embed_dim != embed_dim:
        raise PrepError(f"{path}: head for {head.embed_dim}-d embeddings, the run's are {embed_dim}-d; "
                        "train the head on this run")
    return head, {**head.describe(), "path": str(path.resolve()), "sha256": sha256_file(path)}


# ---------------------------------------------------------------- the stage

@dataclass
class IndexResult:
    out: Path
    n_images: int
    shards_run: int
    shortlist: dict
    warning: str | None
    wall_s: float

    def summary(self) -> str:
        return (f"index {self.out}: {self.n_images} images, {self.shards_run} shard(s) encoded, "
                f"shortlist {self.shortlist.get('type')} ({self.wall_s:.1f}s)")


def _plan_keys(features_manifest_dir: Path, splits: Path | None, split: str | None, store) -> list[str]:
    if splits is None:
        if split is not None:
            raise PrepError("--split needs --splits (the splits folder whose split to index)")
        return store.keys()
    from ..manifests.splits import SPLIT_NAMES, read_split
    names = [split] if split else list(SPLIT_NAMES)
    keys = set()
    for name in names:
        keys |= set(read_split(splits, name, columns=("image_key",))["image_key"])
    missing = sorted(k for k in keys if k not in store)
    if missing:
        raise PrepError(f"{splits}: {len(missing)} image(s) of the split have no ok regions in "
                        f"{features_manifest_dir} (first {missing[0]!r}); pass the features the "
                        "splits were built from")
    return sorted(keys)


def build_index(run: Path, features: Path, out: Path, *, splits: Path | None = None,
                split: str | None = None, captions: Path | None = None,
                head: Path | None = None, dtype: str = "float16", shard_size: int = 1000,
                batch_size: int = 64, workers: int = 0, scheduler: str | None = None,
                threads: int = 1, exact_max: int = EXACT_MAX, overwrite: bool = False,
                echo=print) -> IndexResult:
    """Writes index/ to `out`. Resumable: complete shards are kept; a finished index is a no-op."""
    import torch
    from ..manifests import FeatureStore
    from .distribute import run_tasks
    from .evaluate import checkpoint_path, load_model

    t0 = time.perf_counter()
    out = Path(out)
    checks = [(dtype in ("float16", "float32"), "--dtype must be float16 or float32"),
              (shard_size >= 1, "--shard-size must be >= 1"), (batch_size >= 1, "--batch-size must be >= 1"),
              (workers >= 0, "--workers must be >= 0"), (threads >= 1, "--threads must be >= 1"),
              (exact_max >= 1, "--exact-max must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise PrepError(message)
    ckpt_file = checkpoint_path(run)
    features_manifest = read_features_manifest(features)
    refuse_foreign_folder(out)
    if head is None and Path(run).is_dir() and (Path(run) / "shortlist" / HEAD_NAME).is_file():
        head = Path(run) / "shortlist"
    model, ckpt = load_model(ckpt_file, "cpu")
    embed_dim = int(ckpt["config"]["model"]["embed_dim"])
    if int(features_manifest.get("feature_dim", 0)) != int(ckpt["feature_dim"]):
        raise PrepError(f"{features}: {features_manifest.get('feature_dim')}-d features, but {ckpt_file} "
                        f"was trained on {ckpt['feature_dim']}-d ones")
    shortlist_head, head_info = load_head(head, embed_dim)
    with FeatureStore(features) as store:
        keys = _plan_keys(features, splits, split, store)
    if not keys:
        raise PrepError(f"{features}: no ok images to index")
    ckpt_sha = sha256_file(ckpt_file)
    feat_sha = manifest_sha256(features)
    captions_sha = manifest_sha256_of_splits(captions) if captions else None
    max_regions = ckpt["config"]["training"].get("max_regions")
    plan = faiss_plan(len(keys), exact_max)
    params = {"checkpoint_sha256": ckpt_sha, "features_manifest_sha256": feat_sha, "dtype": dtype,
              "shard_size": shard_size, "batch_size": batch_size, "max_regions": max_regions,
              "threads_per_task": threads, "head_sha256": head_info["sha256"], "head_kind": head_info["kind"],
              "shortlist": plan, "captions_splits_sha256": captions_sha,
              "captions_split": split if captions else None}
    params_fp = fingerprint(params)
    prepare_output(out, params_fp, overwrite)
    if overwrite:
        for name in (SHORTLIST_NAME, HEAD_NAME, CAPTIONS_NAME):
            (out / name).unlink(missing_ok=True)
    listing = hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()
    # extract-regions records random_weights as a bool (older manifests: the seed or null)
    recorded = features_manifest.get("detector", {}).get("random_weights")
    random_features = bool(features_manifest.get("warning")) or (recorded is not None and recorded is not False)
    warning = RANDOM_FEATURES_WARNING if random_features else None
    if warning:
        echo(f"WARNING: {warning}")
    existing = current_manifest(out, params_fp, listing)
    if existing is not None:
        echo(f"index: {out} is complete for these inputs, nothing to do")
        return IndexResult(out, existing["counts"]["ok"], 0, existing["shortlist"]["faiss"], warning,
                           time.perf_counter() - t0)

    tasks = [IndexTask(index=i, checkpoint=str(ckpt_file.resolve()), features=str(Path(features).resolve()),
                       keys=tuple(keys[s:s + shard_size]), out=str(out.resolve()), dtype=dtype,
                       batch_size=batch_size, max_regions=max_regions, params_fingerprint=params_fp,
                       threads=threads)
             for i, s in enumerate(range(0, len(keys), shard_size))]
    done = {}
    for t in tasks:
        stats = completed_shard(t.h5_path, params_fp, lambda st, t=t: st.get("keys") == list(t.keys))
        if stats is not None:
            done[t.index] = stats
    pending = [t for t in tasks if t.index not in done]
    (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out / SHARDS_DIR)
    remove_stale_temps(out)
    echo(f"index: {len(keys)} images in {len(tasks)} shard(s); {len(done)} complete, {len(pending)} to encode")
    t_run = time.perf_counter()
    if pending:
        if workers == 0 and scheduler is None:  # in-process: hand the loaded model to the tasks
            _worker_cache.update(key=(str(ckpt_file.resolve()), str(Path(features).resolve())), model=model,
                                 store=FeatureStore(features))
        results = run_tasks(encode_shard, pending, workers=workers, scheduler=scheduler,
                            on_result=lambda st: echo(f"  {st['shard']}: {st['n_images']} images"))
        for t, stats in zip(pending, results):
            done[t.index] = stats
    encode_s = time.perf_counter() - t_run
    stats = [done[t.index] for t in tasks]

    # Shortlist vectors, shard by shard, from what was written (row i = i-th ok key).
    from ..manifests.shards import ShardReader
    vectors = []
    for st in stats:
        with ShardReader(out / st["shard"]) as reader:
            vectors.append(shard_global_vectors(shortlist_head, reader.dataset("features")[:], reader.offsets))
    vectors = np.concatenate(vectors) if vectors else np.zeros((0, shortlist_head.dim), np.float32)
    head_tmp = temp_path_for(out / HEAD_NAME)
    torch.save(shortlist_head.payload(), head_tmp)
    commit_temp(head_tmp, out / HEAD_NAME)
    write_faiss(build_faiss(vectors, plan), out / SHORTLIST_NAME)
    files = [SHORTLIST_NAME, HEAD_NAME]
    caption_info = None
    if captions is not None:
        caption_info = _index_captions(model, captions, split, out / CAPTIONS_NAME, dtype, batch_size)
        files.append(CAPTIONS_NAME)
    al = ckpt["config"]["alignment"]
    manifest = {
        "parameters": params, "parameters_fingerprint": params_fp,
        "input": {"listing_sha256": listing, "n_images": len(keys)},
        "embed_dim": embed_dim, "dtype": dtype,
        "alignment": {"mode": al["mode"], "drop_tokens": al["drop_tokens"],
                      "word_max_floor_zero": al["word_max_floor_zero"]},
        "tokenizer": ckpt["config"]["text"]["encoder"],
        "caption_rule": run_caption_rule(ckpt.get("lineage"), splits or captions),
        "shortlist": {"path": SHORTLIST_NAME, "faiss": {**plan, "dim": int(vectors.shape[1]),
                                                         "n": int(len(vectors))},
                      "head": {**head_info, "path": HEAD_NAME}},
        "lineage": {"checkpoint": str(ckpt_file.resolve()), "checkpoint_sha256": ckpt_sha,
                    "features": str(Path(features).resolve()), "features_manifest_sha256": feat_sha,
                    "features_input_root": features_manifest.get("input", {}).get("root", ""),
                    "splits": str(Path(splits).resolve()) if splits else None, "split": split,
                    "trained_on": ckpt.get("lineage")},
        "captions": caption_info,
        "timings": {"encode_s": round(encode_s, 3), "wall_s": round(time.perf_counter() - t0, 3)},
    }
    if warning:
        manifest["warning"] = warning
    rows = [r for st in stats for r in st["rows"]]
    written = write_index_manifest(out, rows=rows, shard_stats=stats, manifest=manifest, files=files)
    return IndexResult(out, written["counts"]["ok"], len(pending), manifest["shortlist"]["faiss"],
                       warning, time.perf_counter() - t0)


def manifest_sha256_of_splits(splits: Path) -> str:
    path = Path(splits) / MANIFEST_NAME
    if not path.is_file():
        raise PrepError(f"{path}: --captions needs a splits folder written by `prep build-splits`")
    return sha256_file(path)


def _index_captions(model, splits: Path, split: str | None, path: Path, dtype: str, batch_size: int) -> dict:
    """Word embeddings of every caption of `split` (or of every split) of `splits`."""
    import pandas as pd
    import torch
    from ..manifests.splits import SPLIT_NAMES, read_split
    from ..teran.data import CaptionDataset, make_loader
    names = [split] if split else list(SPLIT_NAMES)
    frame = pd.concat([read_split(splits, n, columns=("image_key", "caption_id", "raw", "input_ids"))
                       for n in names], ignore_index=True)
    words = []
    with torch.no_grad():
        for batch in make_loader(CaptionDataset(frame["input_ids"]), batch_size=batch_size):
            enc = model.encode_captions(batch["input_ids"], batch["word_lengths"]).float().numpy()
            words += [enc[b, :int(n)].copy() for b, n in enumerate(batch["word_lengths"].tolist())]
    write_captions(path, words=words, caption_ids=frame["caption_id"].to_numpy(),
                   image_keys=frame["image_key"].tolist(), raw=frame["raw"].astype(str).tolist(), dtype=dtype)
    return {"path": CAPTIONS_NAME, "splits": str(Path(splits).resolve()), "split": split or "all",
            "n_captions": int(len(frame))}
