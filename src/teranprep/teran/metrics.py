"""Retrieval metrics from a score matrix: ranks, R@K, medr, meanr, rsum, and the 1K fold protocol.

Ranks are 0-based internally, as in the reference; medr = floor(median) + 1, meanr = mean + 1.
Ties count against the query: a wrong item scoring exactly as high as the best right one ranks
above it, so a constant scorer gets no recall (the reference's argsort leaves ties to chance).
"""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)


# Rows (or columns) of a score matrix handled at a time by the rank functions: their boolean and
# float temporaries are then chunk x N, not the whole matrix (at COCO 5K: 512 x 25000 instead
# of 5000 x 25000, ~50 MB instead of ~500 MB per float32 temporary; top_k_rows holds several,
# and at 2048 rows they put the 5K protocol's fp32 peak over 3 GB). The results do not depend
# on it.
RANK_CHUNK = 512


def i2t_ranks(scores: np.ndarray, caption_image: np.ndarray, chunk: int = RANK_CHUNK) -> np.ndarray:
    """(Ni,) rank of each image's best-scored own caption among all captions."""
    ni = scores.shape[0]
    out = np.empty(ni, dtype=np.int64)
    for i0 in range(0, ni, chunk):
        block = scores[i0:i0 + chunk]
        own = caption_image[None, :] == np.arange(i0, i0 + len(block))[:, None]  # (chunk, Nc)
        best_own = np.where(own, block, -np.inf).max(axis=1)
        out[i0:i0 + len(block)] = ((block >= best_own[:, None]) & ~own).sum(axis=1)
    return out


def t2i_ranks(scores: np.ndarray, caption_image: np.ndarray, chunk: int = RANK_CHUNK) -> np.ndarray:
    """(Nc,) rank of each caption's own image among all images."""
    nc = scores.shape[1]
    out = np.empty(nc, dtype=np.int64)
    for c0 in range(0, nc, chunk):
        block = scores[:, c0:c0 + chunk]
        cols = np.arange(block.shape[1])
        owner = caption_image[c0:c0 + block.shape[1]]
        own_score = block[owner, cols]
        own = np.zeros(block.shape, dtype=bool)
        own[owner, cols] = True
        out[c0:c0 + block.shape[1]] = ((block >= own_score[None, :]) & ~own).sum(axis=0)
    return out


def top_k_rows(scores: np.ndarray, k: int, chunk: int = RANK_CHUNK) -> np.ndarray:
    """(rows, k) column indices of each row's k best scores, best first, ties by column: exactly
    a stable argsort of -scores cut at k, computed `chunk` rows at a time (never a whole matrix
    of int64) and without sorting whole rows (stable_top_k)."""
    n, m = scores.shape
    k = min(k, m)
    out = np.empty((n, k), dtype=np.int64)
    for r0 in range(0, n, chunk):
        out[r0:r0 + chunk] = stable_top_k(-scores[r0:r0 + chunk], k)
    return out


def stable_top_k(keys: np.ndarray, k: int) -> np.ndarray:
    """np.argsort(keys, axis=1, kind="stable")[:, :k], in O(columns) per row rather than
    O(columns log columns): a partition finds each row's k-th smallest key; a row with exactly k
    keys at or below it has a unique top-k set, which only is sorted (stable, columns in
    ascending order, so ties stay in column order). Rows with a tie across the k-th place, or a
    NaN among their k smallest, take the full stable argsort: the same answer, rarely."""
    n, m = keys.shape
    k = min(k, m)
    if k == 0 or n == 0:
        return np.empty((n, k), dtype=np.int64)
    keys = np.ascontiguousarray(keys)  # a transposed block (t2i) partitions 2-3x faster row-major
    if 4 * k >= m:  # a partition saves little over a sort of a short row
        return np.argsort(keys, axis=1, kind="stable")[:, :k]
    kth = np.partition(keys, k - 1, axis=1)[:, k - 1:k]  # NaN sorts last, as in argsort
    within = keys <= kth  # False where kth or the key is NaN
    exact = within.sum(axis=1) == k
    out = np.empty((n, k), dtype=np.int64)
    if exact.any():
        rows = np.flatnonzero(exact)
        cols = np.nonzero(within[rows])[1].reshape(len(rows), k)  # ascending within each row
        order = np.argsort(np.take_along_axis(keys[rows], cols, axis=1), axis=1, kind="stable")
        out[rows] = np.take_along_axis(cols, order, axis=1)
    for row in np.flatnonzero(~exact):
        out[row] = np.argsort(keys[row], kind="stable")[:k]
    return out


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
