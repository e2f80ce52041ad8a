"""The index stage: a run + features/ -> index/ (region embeddings, FAISS shortlist, captions).

Every ok image (or one split's) goes once through the run's image encoder; shards of
alignment-space region vectors are written through manifests/ with the features/ rules. A thin
definition on pipeline/common/sharded.py (plan, markers, resume, dry run, run_tasks): an item is
an image key whose signature is where its features are (features shard, that shard's sha256,
row), so features that grew add index shards and a re-extracted features shard re-encodes only
the index shards of its images. The shortlist vectors come from the shards afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PrepError
from ..manifests.atomic import commit_temp, sha256_file, temp_path_for
from ..manifests.build import write_shard
from ..manifests.features import (MANIFEST_NAME, manifest_sha256, prepare_output,
                                  read_features_manifest)
from ..manifests.fingerprint import fingerprint
from ..manifests.index import (CAPTIONS_NAME, HEAD_NAME, SHORTLIST_NAME, refuse_foreign_folder,
                               write_captions, write_index_manifest)
from ..manifests.shards import Regions
from ..manifests.splits import run_caption_rule
from .common.sharded import PlannedItem, ShardedStage, ShardTask
from ..manifests.ownership import releases_locks
from ..manifests.remote import lineage_location, mirror_url, with_remote_folders

RANDOM_FEATURES_WARNING = ("the indexed features came from a detector with random weights: "
                           "search results over them are meaningless")
EXACT_MAX = 100_000  # up to this many images the shortlist is an exact inner-product search
IVF_NPROBE = 32
FAISS_SEED = 1234


@dataclass(frozen=True)
class IndexTask(ShardTask):
    checkpoint: str = ""
    features: str = ""
    keys: tuple = ()
    sources: tuple = ()  # per key: [features shard, its sha256, row], the items' signatures
    dtype: str = "float16"
    batch_size: int = 64
    max_regions: int | None = None
    threads: int = 1
    device: str = "cpu"

    def __repr__(self):  # the executor names failed tasks with this
        return f"IndexTask({self.h5_path.name}, {len(self.keys)} images)"

    def compute(self) -> dict:
        return encode_shard(self)


_worker_cache: dict = {}


def _worker_model_and_store(task: IndexTask):
    """One model and one feature store per worker process, reused across its tasks."""
    from ..manifests import FeatureStore
    from ..teran.checkpoint import load_model
    key = (task.checkpoint, task.features, task.device)
    if _worker_cache.get("key") != key:
        model, _ = load_model(Path(task.checkpoint), task.device)
        _worker_cache.update(key=key, model=model, store=FeatureStore(Path(task.features)))
    return _worker_cache["model"], _worker_cache["store"]


def encode_shard(task: IndexTask) -> dict:
    """Encodes one shard's images and writes their region embeddings; returns the shard stats."""
    import torch
    from ..teran.data import ImageDataset, make_loader
    from .common.distribute import report_progress, tune_malloc_for_tensors
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
                out = model.encode_images(*(batch[k].to(task.device) for k in
                                            ("features", "boxes", "sizes", "region_lengths"))).float().cpu().numpy()
                refuse_nonfinite_embeddings(out, batch, task)
                for b, i in enumerate(batch["index"].tolist()):
                    n = int(batch["region_lengths"][b]) - 1  # slot 0 is never scored: not stored
                    w, h = (int(v) for v in batch["sizes"][b].tolist())
                    items.append(Regions(task.keys[i], w, h, batch["boxes"][b, 1:n + 1].numpy().copy(),
                                         out[b, 1:n + 1].copy()))
                report_progress({"run": task.out, "shard": task.index, "images": len(items)})
        threads_used = int(torch.get_num_threads())  # what this worker ran at, for the manifest
    finally:
        torch.set_num_threads(before)
    ckpt_attr = {"detector": "teran-image-encoder", "weights_sha256": ""}
    return write_shard(task.h5_path, items, feature_dim=model.config["model"]["embed_dim"],
                       dtype=task.dtype, attrs=ckpt_attr, columns=(),
                       params_fingerprint=task.params_fingerprint,
                       extra_stats={"keys": list(task.keys), "sources": [list(s) for s in task.sources],
                                    "device": str(next(model.parameters()).device), "threads": threads_used},
                       marker=False)


def recorded_items(stats: dict) -> list:
    """[(key, signature)] an index marker was computed for (markers before `sources`: none)."""
    keys = stats.get("keys", [])
    return [[k, src] for k, src in zip(keys, stats.get("sources") or [None] * len(keys))]


def refuse_nonfinite_embeddings(out, batch, task: IndexTask) -> None:
    """A NaN/inf region embedding would never rank (or always rank first): one line, no index."""
    from ..manifests.values import require_finite_scores
    lengths = batch["region_lengths"].tolist()
    for b, i in enumerate(batch["index"].tolist()):
        require_finite_scores(out[b, 1:lengths[b]], what=f"{task.checkpoint}: image {task.keys[i]!r}",
                              hint=f"the region embeddings of this model hold NaN/inf (its weights, "
                                   f"or the features in {task.features}: check with `prep verify "
                                   "--full`); no index was written")


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
    from ..safe_torch import load_torch_file
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


@with_remote_folders(inputs=("run", "splits"), outputs={"out": None})
@releases_locks
def build_index(run: Path, features: Path, out: Path, *, splits: Path | None = None,
                split: str | None = None, captions: Path | None = None,
                head: Path | None = None, dtype: str = "float16", shard_size: int = 1000,
                batch_size: int = 64, workers: int | None = None, scheduler: str | None = None,
                device: str = "auto", threads: int = 1, exact_max: int = EXACT_MAX, overwrite: bool = False,
                dry_run: bool = False, echo=print, quiet: bool = False) -> IndexResult:
    """Writes index/ to `out`. Resumable: complete shards are kept; a finished index is a no-op;
    images added to the features later go into new shards."""
    import torch
    from ..devices import device_kind
    from ..manifests import FeatureStore
    from ..teran.checkpoint import checkpoint_path, load_model
    from .common.distribute import check_workers, stage_device
    from ..manifests.claims import refuse_false_claims

    t0 = time.perf_counter()
    out = Path(out)
    if scheduler and mirror_url(out):
        raise PrepError(f"{mirror_url(out)}: an index at a URL is written through this machine's "
                        "mirror, which a scheduler's workers cannot reach; use --workers N (a local "
                        "cluster) or write the index to a shared folder and copy it up")
    workers = check_workers(workers, scheduler, default=0)
    run_device = stage_device(device, scheduler)  # this machine's CUDA, or the workers' report
    checks = [(dtype in ("float16", "float32"), "--dtype must be float16 or float32"),
              (shard_size >= 1, "--shard-size must be >= 1"), (batch_size >= 1, "--batch-size must be >= 1"),
              (threads >= 1, "--threads must be >= 1"),
              (split is None or splits is not None,
               "--split needs --splits (the splits folder whose split to index)"),
              (exact_max >= 1, "--exact-max must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise PrepError(message)
    ckpt_file = checkpoint_path(run)
    features_manifest = read_features_manifest(features)
    refuse_foreign_folder(out, create=not dry_run)
    if head is None and Path(run).is_dir() and (Path(run) / "shortlist" / HEAD_NAME).is_file():
        head = Path(run) / "shortlist"
    model, ckpt = load_model(ckpt_file, "cpu")
    embed_dim = int(ckpt["config"]["model"]["embed_dim"])
    if int(features_manifest.get("feature_dim", 0)) != int(ckpt["feature_dim"]):
        raise PrepError(f"{features}: {features_manifest.get('feature_dim')}-d features, but {ckpt_file} "
                        f"was trained on {ckpt['feature_dim']}-d ones")
    shortlist_head, head_info = load_head(head, embed_dim)
    with FeatureStore(features) as store:
        refuse_false_claims(store)  # a hand-edited feature_dim/dtype: one line, not a crash
        keys = _plan_keys(features, splits, split, store)
        located = dict(zip(store.index["image_key"], zip(store.index["shard"], store.index["row"])))
    if not keys:
        raise PrepError(f"{features}: no ok images to index")
    shard_sha = {e["path"]: e["sha256"] for e in features_manifest.get("shards", [])}
    ckpt_sha = sha256_file(ckpt_file)
    feat_sha = manifest_sha256(features)
    captions_sha = manifest_sha256_of_splits(captions) if captions else None
    max_regions = ckpt["config"]["training"].get("max_regions")
    plan = faiss_plan(len(keys), exact_max)
    # Not the features manifest's sha256 (lineage records it): features that grew must not
    # invalidate the index, only the shards whose images' features changed (their signatures).
    params = {"checkpoint_sha256": ckpt_sha,
              "features_parameters_fingerprint": features_manifest.get("parameters_fingerprint"),
              "dtype": dtype,
              "shard_size": shard_size, "batch_size": batch_size, "max_regions": max_regions,
              "threads_per_task": threads, "device": device_kind(run_device), "head_sha256": head_info["sha256"], "head_kind": head_info["kind"],
              "shortlist": plan, "captions_splits_sha256": captions_sha,
              "captions_split": split if captions else None}
    params_fp = fingerprint(params)
    prepare_output(out, params_fp, overwrite and not dry_run)
    if overwrite and not dry_run:
        for name in (SHORTLIST_NAME, HEAD_NAME, CAPTIONS_NAME):
            (out / name).unlink(missing_ok=True)
    items = [PlannedItem(k, [located[k][0], shard_sha.get(located[k][0], ""), int(located[k][1])])
             for k in keys]

    # features at a URL go to the workers by URL: each reads them through its own cache
    features_location = lineage_location(features)

    def make_task(index, members):
        return IndexTask(index=index, out=str(out.resolve()), params_fingerprint=params_fp,
                         checkpoint=str(ckpt_file.resolve()), features=features_location,
                         keys=tuple(m.key for m in members), sources=tuple(tuple(m.signature) for m in members),
                         dtype=dtype, batch_size=batch_size, max_regions=max_regions, threads=threads,
                         device=run_device)

    stage = ShardedStage("index", out, items, shard_size, params_fp, make_task, recorded_items)
    listing = stage.listing
    if dry_run:
        for line in stage.report_lines():
            echo(line)
        return IndexResult(out, len(keys), 0, {"type": plan["type"]}, None, time.perf_counter() - t0)
    # extract-regions records random_weights as a bool (older manifests: the seed or null)
    recorded = features_manifest.get("detector", {}).get("random_weights")
    random_features = bool(features_manifest.get("warning")) or (recorded is not None and recorded is not False)
    warning = RANDOM_FEATURES_WARNING if random_features else None
    if warning:
        echo(f"WARNING: {warning}")
    existing = stage.current_manifest()
    if existing is not None:
        echo(f"index: {out} is complete for these inputs, nothing to do")
        return IndexResult(out, existing["counts"]["ok"], 0, existing["shortlist"]["faiss"], warning,
                           time.perf_counter() - t0)

    pending = stage.pending
    echo(f"index: {len(keys)} images in {len(stage.tasks)} shard(s); {len(stage.done)} complete, "
         f"{len(pending)} to encode")
    t_run = time.perf_counter()
    if workers == 0 and scheduler is None and pending:  # in-process: hand the loaded model to the tasks
        _worker_cache.update(key=(str(ckpt_file.resolve()), str(Path(features).resolve()), run_device),
                             model=model if run_device == "cpu" else load_model(ckpt_file, run_device)[0],
                             store=FeatureStore(features))
    from .common.progress import ExtractProgress
    bar = ExtractProgress(sum(len(t.keys) for t in pending), quiet=quiet, label="index")
    try:
        stage.run(workers=workers, scheduler=scheduler,
                  on_result=lambda st: echo(f"  {st['shard']}: {st['n_images']} images"),
                  on_progress=lambda p: p.get("run") == str(out.resolve()) and bar.shard_progress(
                      {"shard": p["shard"], "done": p["images"], "errors": 0}))
    finally:
        bar.close()
    encode_s = time.perf_counter() - t_run
    stats = stage.ordered_stats()

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
        "lineage": {"checkpoint": lineage_location(ckpt_file), "checkpoint_sha256": ckpt_sha,
                    "features": features_location,
                    "features_manifest_sha256": feat_sha,
                    "features_input_root": features_manifest.get("input", {}).get("root", ""),
                    "splits": lineage_location(splits) if splits else None, "split": split,
                    "trained_on": ckpt.get("lineage")},
        "captions": caption_info,
        "timings": {"encode_s": round(encode_s, 3), "wall_s": round(time.perf_counter() - t0, 3)},
        # as the workers reported them (a scheduler's workers, not this driver)
        "devices": {"requested": device, "used": sorted({st.get("device", "") for st in stats}),
                    "threads_per_task": sorted({st.get("threads", 0) for st in stats})},
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
    return {"path": CAPTIONS_NAME, "splits": lineage_location(splits), "split": split or "all",
            "n_captions": int(len(frame))}
