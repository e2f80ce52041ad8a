"""The eval stage: a run or checkpoint + splits/ -> R@1/5/10 both ways, rsum, medr, meanr, rankings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..manifests.atomic import atomic_write_bytes, canonical_json
from ..manifests.lineage_warnings import emit, features_warnings, merge, recorded_warnings, warning_fields
from ..manifests.values import require_finite_scores
from ..teran.checkpoint import checkpoint_path, load_model
from ..manifests.ownership import releases_locks
from ..manifests.remote import beside_run, with_remote_folders

PROTOCOLS = ("all", "1k", "5k")
TOP_K_SAVED = 10
# eval encodes and scores this many caption blocks (of --caption-block) at a time: the words of
# 2,000 captions by default, whatever the split's size
CAPTION_ENCODE_BLOCKS = 4
NDCG_LABELS = {"ndcg_rougeL": "NDCG@25(ROUGE-L)", "ndcg_spice": "NDCG@25(SPICE)"}


def eval_dir_name(split: str, protocol: str, precision: str = "fp32") -> str:
    return f"eval-{split}-{protocol}" + ("" if precision == "fp32" else f"-{precision}")


def default_eval_dir(source: Path, split: str, protocol: str, precision: str = "fp32") -> Path:
    base = Path(source) if Path(source).is_dir() else Path(source).parent
    return base / eval_dir_name(split, protocol, precision)


def _default_eval_url(arguments) -> str | None:
    """eval of a run at a URL writes RUN_URL/eval-SPLIT-PROTOCOL/ by default, as on disk."""
    return beside_run(arguments.get("source"), eval_dir_name(
        arguments.get("split", "test"), arguments.get("protocol", "all"), arguments.get("precision", "fp32")))


@with_remote_folders(inputs=("source", "splits_dir"), outputs={"out": _default_eval_url})
@releases_locks
def evaluate(source: Path, splits_dir: Path, *, split: str = "test", protocol: str = "all",
             features: Path | None = None, out: Path | None = None, device: str = "auto",
             batch_size: int = 64, image_block: int = 100, caption_block: int = 500,
             fold_size: int = 1000, text_encoder: Path | None = None, ndcg: bool = True,
             relevance_files=(), relevance_cache: Path | None = None, scheduler: str | None = None,
             workers: int | None = None, precision: str = "fp32", drift: bool | None = None,
             echo=print, quiet: bool = False) -> dict:
    """Scores every image of `split` against every caption, block by block, and writes
    metrics.json + rankings.npz to `out` (default: RUN/eval-SPLIT-PROTOCOL/, -bf16 appended for
    bf16). With `ndcg`, also NDCG@25 per direction over ROUGE-L relevance (cached beside splits/)
    and `relevance_files`. `precision` bf16 encodes and scores under bf16 autocast; with `drift`
    (the default for bf16) the same checkpoint is also scored in fp32 and metrics.json gets
    `drift_vs_fp32`. `quiet`: no progress lines (of the ROUGE-L relevance computation)."""
    from ..devices import resolve_device
    from ..teran.precision import check_precision
    from .common.distribute import check_workers
    check_precision(precision)
    dev = torch.device(resolve_device(device))  # the model runs here; a scheduler serves ROUGE-L only
    if drift and precision == "fp32":
        raise PrepError("--drift compares bf16 scores with fp32 ones; it needs --precision bf16")
    drift = precision != "fp32" if drift is None else drift
    from ..teran.data import load_split, open_features
    from ..teran.metrics import i2t_ranks, retrieval_metrics, t2i_ranks, top_k_rows
    from ..teran.scoring import encode_captions, encode_images, model_score_matrix, padded_runs

    if protocol not in PROTOCOLS:
        raise PrepError(f"--protocol {protocol!r}: choose one of {PROTOCOLS}")
    out = default_eval_dir(source, split, protocol, precision) if out is None else Path(out)
    # Checked before minutes of scoring: a writable folder of its own, inside no features/ or splits/.
    from ..manifests.ownership import EVAL, RUN, claim_output_dir
    claim_output_dir(out, EVAL, allow_inside=(RUN,), create=False)
    if not ndcg and (relevance_files or relevance_cache or scheduler or workers):
        raise PrepError("--no-ndcg: --relevance, --relevance-cache, --scheduler and --workers "
                        "only serve NDCG; drop them or drop --no-ndcg")
    workers = check_workers(workers, scheduler, default=0)
    model, ckpt = load_model(source, dev, text_encoder=text_encoder)
    store = open_features(splits_dir, features)
    warnings = merge(recorded_warnings(ckpt.get("lineage")), features_warnings(store.root, store.manifest))
    emit("eval", warnings)
    if store.feature_dim != ckpt["feature_dim"]:
        raise PrepError(f"{store.root}: {store.feature_dim}-d features, but {checkpoint_path(source)} "
                        f"was trained on {ckpt['feature_dim']}-d ones")
    data = load_split(splits_dir, split, store)
    from .train import refuse_long_captions
    refuse_long_captions(splits_dir, data, model.text_encoder.config.max_position_embeddings)
    n_images = len(data.image_keys)
    if protocol == "5k":
        if n_images < 5 * fold_size:
            raise PrepError(f"{splits_dir}/{split}.parquet: {n_images} images, the 5K protocol "
                            f"needs {5 * fold_size}; use --protocol all")
        data = load_split(splits_dir, split, store, max_images=5 * fold_size)
    if protocol == "1k" and n_images % fold_size:
        raise PrepError(f"{splits_dir}/{split}.parquet: {n_images} images are not whole folds of "
                        f"{fold_size}; use --protocol all")
    scorer = None
    if ndcg:
        from .relevance import ndcg_scorer
        scorer = ndcg_scorer(splits_dir, split, data, relevance_files=relevance_files,
                             cache_dir=relevance_cache, scheduler=scheduler, workers=workers, echo=echo,
                             quiet=quiet)
    max_regions = ckpt["config"]["training"]["max_regions"]
    # Every image's regions are held; the captions are encoded and scored a block at a time
    # (score_blocks): a split's words padded to its longest caption were the largest tensor of
    # an eval (COCO 5K in fp32: 25,000 x ~50 tokens x 1024 = 5 GB).
    precisions = [precision] + (["fp32"] if drift else [])
    encoded_images = {p: encode_images(model, data.image_keys, store, batch_size=batch_size, device=dev,
                                       max_regions=max_regions, precision=p) for p in precisions}
    model.release_image_side()  # captions and scores need only the text side from here on
    from .common.distribute import return_free_memory
    return_free_memory()
    input_ids = list(data.captions["input_ids"])
    drift_stats = DriftStats() if drift else None
    from ..teran.metrics import fold_slices
    from ..teran.scoring import EncodedSplit

    def score_blocks(images, caps, p):
        """(images x caps) scores: captions encoded CAPTION_ENCODE_BLOCKS x caption_block at a
        time and scored against every image of the group, then dropped. The chunks take the
        captions in order of length and end before padding would pass 1.25x their words
        (padded_runs), so each chunk's words are padded to about its own length (COCO: mean 13.5
        pieces, a few of 30-50; 2,000 captions padded to 50 were 410 MB in fp32, now ~120 MB)
        and the encoder's batches carry little padding."""
        regions, rlens = encoded_images[p]
        out = np.empty((len(images), len(caps)), dtype=np.float32)
        if len(images) and np.array_equal(images, np.arange(images[0], images[0] + len(images))):
            images = slice(int(images[0]), int(images[0]) + len(images))  # a view of the regions,
            # not a copy of them for every caption chunk (723 MB at COCO 5K in fp32)
        lengths = np.array([len(input_ids[i]) for i in caps])
        by_length = np.argsort(lengths, kind="stable")  # columns of out
        for c0, c1 in padded_runs(lengths[by_length].tolist(), CAPTION_ENCODE_BLOCKS * caption_block):
            columns = by_length[c0:c1]
            words, wlens = encode_captions(model, [input_ids[i] for i in caps[columns]],
                                           batch_size=batch_size, device=dev, precision=p)
            sub = EncodedSplit(regions[images], rlens[images], words, wlens)
            out[:, columns] = model_score_matrix(model, sub, image_block=image_block,
                                                 caption_block=caption_block, device=dev, precision=p)
            del words, sub
        return out

    # 1K scores only the diagonal fold blocks (as the reference), "all"/"5k" the whole matrix.
    groups = (fold_slices(len(data.image_keys), fold_size) if protocol == "1k"
              else [np.arange(len(data.image_keys))])
    per_fold, rankings = [], {"i2t_rank": [], "t2i_rank": [], "i2t_top": [], "t2i_top": [],
                              "caption_index": []}
    for group, images in enumerate(groups):
        caps = np.flatnonzero(np.isin(data.caption_image, images))
        scores = score_blocks(images, caps, precision)
        require_finite_scores(scores, what=f"{checkpoint_path(source)} on {splits_dir}/{split}.parquet",
                              hint=f"its weights or the features hold NaN/inf (check with `prep verify "
                                   f"{Path(source)}` and `prep verify {store.root} --full`); nothing "
                                   "was written")
        owner = data.caption_image[caps] - images[0]
        if drift_stats is not None:
            drift_stats.add(score_blocks(images, caps, "fp32"), scores, owner)
        if group == len(groups) - 1:  # nothing is encoded or scored after this: the metrics,
            encoded_images.clear()    # rankings and NDCG need only the scores (at COCO 5K the
            model = None              # regions and the text side are ~1 GB in fp32)
        per_fold.append(retrieval_metrics(scores, owner))
        if scorer is not None:
            for direction, values in scorer.fold(images, caps, scores).items():
                per_fold[-1][direction].update(values)
        k = min(TOP_K_SAVED, scores.shape[1])
        rankings["i2t_rank"].append(i2t_ranks(scores, owner))
        rankings["t2i_rank"].append(t2i_ranks(scores, owner))
        # Top-k as split-wide indices (images into image_keys, captions into the split's rows).
        rankings["i2t_top"].append(caps[top_k_rows(scores, k)])
        rankings["t2i_top"].append(images[top_k_rows(scores.T, min(k, len(images)))])
        rankings["caption_index"].append(caps)
        del scores
    if protocol == "1k":
        metrics = {d: {key: _mean_of_folds([f[d][key] for f in per_fold]) for key in per_fold[0][d]}
                   for d in ("i2t", "t2i")}
        metrics["rsum"] = float(np.mean([f["rsum"] for f in per_fold]))
        metrics["folds"] = per_fold
    else:
        metrics = per_fold[0]
    metrics.update(split=split, protocol=protocol, n_images=len(data.image_keys),
                   n_captions=len(data.caption_image), checkpoint=str(checkpoint_path(source)),
                   text_encoder=ckpt.get("text_encoder") or {"config": ckpt["text_config"],
                                                             "source": "checkpoint"},
                   precision=precision, **warning_fields(warnings))
    if scorer is not None:
        metrics["relevance"] = scorer.sources
    if drift_stats is not None:
        metrics["drift_vs_fp32"] = drift_stats.summary(metrics)

    claim_output_dir(out, EVAL, allow_inside=(RUN,))  # created only now that there is a result
    caption_index = np.concatenate(rankings["caption_index"])
    # Ranks are 0-based and within the scored block (the fold for 1k); rows follow image_keys
    # for images and caption_index (rows of SPLIT.parquet) for captions.
    np.savez_compressed(
        out / "rankings.npz", image_keys=np.array(data.image_keys),
        caption_index=caption_index, caption_ids=data.captions["caption_id"].to_numpy()[caption_index],
        caption_image=data.caption_image[caption_index],
        i2t_rank=np.concatenate(rankings["i2t_rank"]), t2i_rank=np.concatenate(rankings["t2i_rank"]),
        i2t_top=np.concatenate(rankings["i2t_top"]), t2i_top=np.concatenate(rankings["t2i_top"]))
    atomic_write_bytes(out / "metrics.json", canonical_json(metrics))
    echo(format_metrics(metrics))
    if "drift_vs_fp32" in metrics:
        echo(format_drift(metrics["drift_vs_fp32"]))
    store.close()
    return metrics


def _mean_of_folds(values: list):
    # NDCG is None for a fold where no query counts (see teran/relevance.mean_ndcg).
    return None if any(v is None for v in values) else float(np.mean(values))


class DriftStats:
    """How far reduced-precision scores are from fp32 scores of the same checkpoint, gathered
    fold by fold: Pearson correlation over every score, the largest change of a query's
    ground-truth rank, and (in summary) the recall differences."""

    def __init__(self):
        self.sums = np.zeros(6)  # n, sum x, sum y, sum x^2, sum y^2, sum xy (x fp32, y the other)
        self.max_rank_change = {"i2t": 0, "t2i": 0}
        self.reference_folds: list[dict] = []

    def add(self, fp32_scores: np.ndarray, scores: np.ndarray, owner: np.ndarray) -> None:
        from ..teran.metrics import i2t_ranks, retrieval_metrics, t2i_ranks
        x, y = fp32_scores.astype(np.float64).ravel(), scores.astype(np.float64).ravel()
        self.sums += [x.size, x.sum(), y.sum(), x @ x, y @ y, x @ y]
        for d, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
            change = np.abs(ranks(scores, owner).astype(np.int64) - ranks(fp32_scores, owner))
            self.max_rank_change[d] = max(self.max_rank_change[d], int(change.max(initial=0)))
        self.reference_folds.append(retrieval_metrics(fp32_scores, owner))

    def summary(self, metrics: dict) -> dict:
        n, sx, sy, sxx, syy, sxy = self.sums
        cov, vx, vy = sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n
        corr = float(cov / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else 1.0
        folds = self.reference_folds
        fp32 = {d: {k: float(np.mean([f[d][k] for f in folds])) for k in ("r1", "r5", "r10")}
                for d in ("i2t", "t2i")}
        diff = {d: {k: metrics[d][k] - fp32[d][k] for k in fp32[d]} for d in fp32}
        return {"score_correlation": corr, "max_rank_change": self.max_rank_change,
                "fp32_recall": fp32, "recall_difference": diff,
                "max_abs_recall_difference": max(abs(v) for d in diff.values() for v in d.values())}


def format_drift(d: dict) -> str:
    diff = d["recall_difference"]
    parts = "  ".join(f"{name} R@{k[1:]} {diff[name][k]:+.2f}" for name in ("i2t", "t2i") for k in diff[name])
    return (f"  drift vs fp32: score correlation {d['score_correlation']:.6f}, largest rank change "
            f"i2t {d['max_rank_change']['i2t']} / t2i {d['max_rank_change']['t2i']}\n  {parts}")


def format_metrics(m: dict) -> str:
    lines = [f"{m.get('split', '')} ({m.get('protocol', '')}): {m.get('n_images', '?')} images, "
             f"{m.get('n_captions', '?')} captions"]
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        r = m[d]
        ndcgs = "".join(f"  {label} {'n/a' if r[key] is None else format(r[key], '.4f')}"
                        for key, label in NDCG_LABELS.items() if key in r)
        lines.append(f"  {name}: R@1 {r['r1']:.1f}  R@5 {r['r5']:.1f}  R@10 {r['r10']:.1f}  "
                     f"medr {r['medr']:.1f}  meanr {r['meanr']:.1f}{ndcgs}")
    lines.append(f"  rsum {m['rsum']:.1f}")
    return "\n".join(lines)
