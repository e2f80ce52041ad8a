"""Caption-to-image relevance (ROUGE-L, as mesnico/TERAN's evaluate_utils) and NDCG@K over it.

Relevance of image j to caption i: ROUGE-L of caption i against image j's reference captions,
on `text.lower().split(" ")` tokens, with the maximum precision and the maximum recall over the
references combined into F with beta 1.2 (the COCO caption evaluation's Rouge). The matrix is
captions x images; image-to-text queries read it by column.
"""

from __future__ import annotations

import numpy as np

from .metrics import stable_top_k

ROUGE_BETA = 1.2
NDCG_RANK = 25
MAX_BITS = 64  # candidate tokens one machine word holds in the bit-parallel LCS


def caption_tokens(text: str) -> list[str]:
    # split(" "), not split(): the reference keeps the empty tokens of doubled or edge spaces.
    return text.lower().split(" ")


def lcs_length(a: list, b: list) -> int:
    """Longest common subsequence of two token lists: the textbook dynamic programme."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, references: list[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F of one caption against one image's references, pair by pair (the definition)."""
    cand = caption_tokens(candidate)
    precisions, recalls = [], []
    for reference in references:
        ref = caption_tokens(reference)
        lcs = lcs_length(ref, cand)
        precisions.append(lcs / float(len(cand)))
        recalls.append(lcs / float(len(ref)))
    p, r = max(precisions), max(recalls)
    if p == 0 or r == 0:
        return 0.0
    return ((1 + beta ** 2) * p * r) / float(r + beta ** 2 * p)


class TokenizedCaptions:
    """A split's captions as integer token ids, arranged for the bit-parallel LCS.

    `tokens[t]` holds token t of every caption (padded with -1), captions in order of decreasing
    length, so at step t only a prefix (`active[t]`) is still running and is contiguous; `by_length` maps those rows back to caption
    indices. `image_order`/`image_starts` group captions by image for the per-image maxima.
    """

    def __init__(self, captions: list[str], caption_image: np.ndarray, n_images: int):
        vocabulary: dict[str, int] = {}
        ids = [[vocabulary.setdefault(t, len(vocabulary)) for t in caption_tokens(c)] for c in captions]
        self.ids = ids
        self.vocab_size = len(vocabulary)
        self.lengths = np.array([len(x) for x in ids], dtype=np.int64)
        self.by_length = np.argsort(-self.lengths, kind="stable")
        width = int(self.lengths.max()) if len(ids) else 0
        self.tokens = np.full((width, len(ids)), -1, dtype=np.int64)
        for row, caption in enumerate(self.by_length):
            self.tokens[:self.lengths[caption], row] = ids[caption]
        sorted_lengths = self.lengths[self.by_length]
        self.active = [int(np.count_nonzero(sorted_lengths > t)) for t in range(width)]
        caption_image = np.asarray(caption_image, dtype=np.int64)
        if len(ids) and (caption_image.min() < 0 or caption_image.max() >= n_images
                         or len(np.unique(caption_image)) != n_images):
            raise ValueError("every image needs at least one caption, and captions only known images")
        self.n_images = n_images
        self.image_order = np.argsort(caption_image, kind="stable")
        counts = np.bincount(caption_image, minlength=n_images)
        self.image_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # Position of caption c in length order, gathered in image order.
        rank_of = np.empty(len(ids), dtype=np.int64)
        rank_of[self.by_length] = np.arange(len(ids))
        self.image_order_in_length_rows = rank_of[self.image_order]
        self.reference_lengths = self.lengths[self.image_order].astype(np.float64)


def _lcs_bit_parallel(candidate: list[int], refs: TokenizedCaptions, match: np.ndarray,
                      state: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """LCS of `candidate` (<= 64 tokens) with every caption, rows in length order.

    Allison-Dix / Hyyrö: bit k of V is 0 where the LCS grows at candidate position k; per
    reference token y: U = V & M[y]; V = (V + U) | (V - U). Padding (-1) never occurs: a row
    stops being updated once its caption has ended (the `active` prefix).
    """
    for position, token in enumerate(candidate):
        match[token] |= np.uint64(1) << np.uint64(position)
    state[:] = np.uint64(0xFFFFFFFFFFFFFFFF)
    for step, n in enumerate(refs.active):
        v, u, w = state[:n], scratch[0, :n], scratch[1, :n]
        np.take(match, refs.tokens[step, :n], out=u)
        np.bitwise_and(v, u, out=u)
        np.subtract(v, u, out=w)
        np.add(v, u, out=v)
        np.bitwise_or(v, w, out=v)
    match[candidate] = 0
    low = np.uint64((1 << len(candidate)) - 1) if len(candidate) < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    return _popcount(np.bitwise_and(np.invert(state), low))


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(words).astype(np.int64)
    return np.unpackbits(words.view(np.uint8)).reshape(len(words), 64).sum(axis=1, dtype=np.int64)


def _lcs_dynamic(candidate: list[int], refs: TokenizedCaptions) -> np.ndarray:
    """The same LCS for a candidate too long for one word: the DP, vectorised over captions."""
    width, n = refs.tokens.shape
    previous = np.zeros((n, width + 1), dtype=np.int64)
    for token in candidate:
        current = np.zeros_like(previous)
        equal = refs.tokens.T == token
        for j in range(1, width + 1):
            current[:, j] = np.where(equal[:, j - 1], previous[:, j - 1] + 1,
                                     np.maximum(previous[:, j], current[:, j - 1]))
        previous = current
    return previous[np.arange(n), refs.lengths[refs.by_length]]


def rouge_l_rows(refs: TokenizedCaptions, rows, beta: float = ROUGE_BETA, done=None) -> np.ndarray:
    """(len(rows), n_images) float32: ROUGE-L of each caption in `rows` against every image.
    `done(n)`, when given, is called after each row with the rows finished so far."""
    rows = list(rows)
    out = np.empty((len(rows), refs.n_images), dtype=np.float32)
    match = np.zeros(max(refs.vocab_size, 1), dtype=np.uint64)
    n = len(refs.lengths)
    state = np.empty(n, dtype=np.uint64)
    scratch = np.empty((2, n), dtype=np.uint64)
    beta2 = beta ** 2
    for i, caption in enumerate(rows):
        candidate = refs.ids[caption]
        if len(candidate) <= MAX_BITS:
            lcs = _lcs_bit_parallel(candidate, refs, match, state, scratch)
        else:
            lcs = _lcs_dynamic(candidate, refs)
        lcs = lcs[refs.image_order_in_length_rows]  # captions grouped by image
        best_lcs = np.maximum.reduceat(lcs, refs.image_starts)
        p = best_lcs / float(len(candidate))
        r = np.maximum.reduceat(lcs / refs.reference_lengths, refs.image_starts)
        with np.errstate(invalid="ignore", divide="ignore"):
            # Same operations in the same order as the reference, so float64 results agree.
            f = ((1 + beta2) * p * r) / (r + beta2 * p)
        out[i] = np.where((p == 0) | (r == 0), 0.0, f)
        if done is not None:
            done(i + 1)
    return out


# --- NDCG -----------------------------------------------------------------------------------

def ndcg_from_ranking(relevance: np.ndarray, ranking: np.ndarray) -> float:
    """NDCG of one ranked list: gains 2^rel - 1, discounts log2(rank + 1) with rank from 1,
    normalised by the DCG of the ideal ordering cut at the same length; 0 when that is 0."""
    relevance = np.asarray(relevance, dtype=np.float64)
    ranking = np.asarray(ranking)
    discounts = np.log2(np.arange(len(ranking)) + 2)
    ideal = np.sort(relevance)[::-1][:len(ranking)]
    best = float(np.sum((2 ** ideal - 1) / discounts))
    if best == 0:
        return 0.0
    return float(np.sum((2 ** relevance[ranking] - 1) / discounts)) / best


def ndcg_many(relevance: np.ndarray, top: np.ndarray) -> np.ndarray:
    """ndcg_from_ranking for every row: relevance (Q, N) of each query's candidates, top (Q, k)."""
    relevance = np.asarray(relevance, dtype=np.float64)
    k = top.shape[1]
    discounts = 1.0 / np.log2(np.arange(k) + 2)
    gains = np.exp2(np.take_along_axis(relevance, top, axis=1)) - 1
    if k < relevance.shape[1]:
        ideal = -np.partition(-relevance, k - 1, axis=1)[:, :k]
    else:
        ideal = relevance
    ideal = -np.sort(-ideal, axis=1)[:, :k]
    best = (np.exp2(ideal) - 1) @ discounts
    actual = gains @ discounts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(best == 0, 0.0, actual / np.where(best == 0, 1.0, best))


def mean_ndcg(values: np.ndarray, direction: str) -> float | None:
    """The reference's averages: text-to-image over every query; image-to-text over the queries
    whose NDCG is not 0 (evaluation.py i2t); None when no query counts."""
    values = np.asarray(values, dtype=np.float64)
    if direction == "i2t":
        values = values[values != 0]
    return float(values.mean()) if len(values) else None


# fold_ndcg's float64 rows per chunk: chunk x width x 8 bytes stays near 32 MB (ndcg_many holds a
# few such copies), e.g. 167 image queries x 25,000 captions at COCO 5K instead of 2,048 (410 MB)
NDCG_CHUNK_VALUES = 2 ** 22


def fold_ndcg(relevance: np.ndarray, scores: np.ndarray, rank: int = NDCG_RANK,
              chunk: int | None = None) -> dict:
    """{i2t: mean NDCG@rank, t2i: ...} for one scored block: relevance (captions x images) and
    scores (images x captions) over the same captions and images (a fold in the 1K protocol).
    Queries go in chunks, so only `chunk` rows are ever held in float64 (default: as many as
    keep a chunk near NDCG_CHUNK_VALUES values). The chunk changes nothing but float64 rounding."""
    n_images, n_captions = scores.shape
    k_caps, k_imgs = min(rank, n_captions), min(rank, n_images)
    i2t, t2i = [], []
    chunk_i2t = chunk or max(1, NDCG_CHUNK_VALUES // max(n_captions, 1))
    chunk_t2i = chunk or max(1, NDCG_CHUNK_VALUES // max(n_images, 1))
    for start in range(0, n_images, chunk_i2t):
        part = slice(start, start + chunk_i2t)
        top = stable_top_k(-scores[part], k_caps)
        i2t.append(ndcg_many(relevance[:, part].T, top))
    for start in range(0, n_captions, chunk_t2i):
        part = slice(start, start + chunk_t2i)
        top = stable_top_k(-scores[:, part].T, k_imgs)
        t2i.append(ndcg_many(relevance[part], top))
    return {"i2t": mean_ndcg(np.concatenate(i2t), "i2t"), "t2i": mean_ndcg(np.concatenate(t2i), "t2i")}
