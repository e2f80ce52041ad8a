"""Retrieval metrics from a score matrix: ranks, R@K, medr, meanr, rsum, and the 1K fold protocol.

Ranks are 0-based internally, as in the reference; medr = floor(median) + 1, meanr = mean + 1.
Ties count against the query: a wrong item scoring exactly as high as the best right one ranks
above it, so a constant scorer gets no recall (the reference's argsort leaves ties to chance).
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)


def i2t_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """(Ni,) rank of each image's best-scored own caption among all captions."""
    ni = scores.shape[0]
    own = caption_image[None, :] == np.arange(ni)[:, None]  # (Ni, Nc)
    best_own = np.where(own, scores, -np.inf).max(axis=1)
    return ((scores >= best_own[:, None]) & ~own).sum(axis=1)


def t2i_ranks(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    """(Nc,) rank of each caption's own image among all images."""
    nc = scores.shape[1]
    own_score = scores[caption_image, np.arange(nc)]
    own = np.zeros(scores.shape, dtype=bool)
    own[caption_image, np.arange(nc)] = True
    return ((scores >= own_score[None, :]) & ~own).sum(axis=0)


def rank_summary(ranks: np.ndarray) -> dict:
    out = {f"r{k}": 100.0 * float(np.mean(ranks < k)) for k in RECALL_KS}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray) -> dict:
    """{i2t: {r1, r5, r10, medr, meanr}, t2i: {...}, rsum} for one image x caption score matrix.
    A matrix holding NaN/inf is refused (PrepError): NaN compares false, so it would rank first."""
    from ..manifests.values import require_finite_scores
    require_finite_scores(scores, what="retrieval metrics", hint="the scores come from a model or "
                          "features that hold NaN/inf")
    i2t = rank_summary(i2t_ranks(scores, caption_image))
    t2i = rank_summary(t2i_ranks(scores, caption_image))
    rsum = sum(i2t[f"r{k}"] + t2i[f"r{k}"] for k in RECALL_KS)
    return {"i2t": i2t, "t2i": t2i, "rsum": rsum}


def fold_slices(n_images: int, fold_size: int) -> list[np.ndarray]:
    """Image index ranges of the 1K protocol: consecutive folds of `fold_size` images."""
    if n_images % fold_size:
        raise ValueError(f"{n_images} images are not a whole number of {fold_size}-image folds")
    return [np.arange(f * fold_size, (f + 1) * fold_size) for f in range(n_images // fold_size)]


def fold_metrics(scores: np.ndarray, caption_image: np.ndarray, fold_size: int = 1000) -> dict:
    """The COCO 1K protocol: metrics on each fold's images and their captions, averaged."""
    per_fold = []
    for images in fold_slices(scores.shape[0], fold_size):
        cols = np.flatnonzero(np.isin(caption_image, images))
        sub = scores[np.ix_(images, cols)]
        per_fold.append(retrieval_metrics(sub, caption_image[cols] - images[0]))
    mean = {d: {k: float(np.mean([f[d][k] for f in per_fold])) for k in per_fold[0][d]}
            for d in ("i2t", "t2i")}
    mean["rsum"] = float(np.mean([f["rsum"] for f in per_fold]))
    mean["folds"] = per_fold
    return mean
