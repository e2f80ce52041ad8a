"""Recall, medr/meanr and the 1K fold protocol against hand-made rankings."""

from __future__ import annotations

import numpy as np
import pytest

from teranprep.teran.metrics import fold_metrics, i2t_ranks, retrieval_metrics, t2i_ranks


def test_ranks_from_hand_made_scores():
    # 3 images, 2 captions each (caption c belongs to image c // 2).
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    s = np.array([[0.9, 0.1, 0.8, 0.0, 0.0, 0.0],   # best own 0.9, nothing above -> rank 0
                  [0.5, 0.6, 0.2, 0.3, 0.7, 0.4],   # best own 0.3; 0.5,0.6,0.7,0.4 above -> rank 4
                  [0.4, 0.0, 0.0, 0.0, 0.1, 0.4]])  # best own 0.4; caption 0 ties it -> rank 1
    assert i2t_ranks(s, caption_image).tolist() == [0, 4, 1]
    # Column c: own image's score vs the other images' (ties count against: column 5's 0.4).
    assert t2i_ranks(s, caption_image).tolist() == [0, 1, 1, 0, 1, 1]
    # By hand from those ranks: i2t 1 of 3 at rank 0, all below 5; median rank 1, mean 5/3;
    # t2i 2 of 6 at rank 0, median 1, mean 4/6. rsum = 2 * (100/3 + 100 + 100).
    m = retrieval_metrics(s, caption_image)
    assert m["i2t"] == pytest.approx({"r1": 100 / 3, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 8 / 3})
    assert m["t2i"] == pytest.approx({"r1": 100 / 3, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 5 / 3})
    assert m["rsum"] == pytest.approx(1400 / 3)


def test_summary_uses_reference_medr_and_meanr():
    caption_image = np.arange(4)
    # i2t ranks 0, 2, 5, 11 via a diagonal design: image i's own caption sits below k others.
    s = np.zeros((4, 4))
    for i, k in enumerate([0, 1, 2, 3]):
        s[i, i] = 1.0
        s[i, [j for j in range(4) if j != i][:k]] = 2.0
    m = retrieval_metrics(s, caption_image)
    # ranks 0,1,2,3: R@1 = 25, R@5 = R@10 = 100, medr = floor(1.5) + 1 = 2, meanr = 1.5 + 1.
    assert m["i2t"] == {"r1": 25.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.5}
    # t2i by hand: caption 0 is outscored by images 1, 2, 3 (rank 3), caption 1 by 2, 3, caption 2
    # by 3, caption 3 by none: ranks 3, 2, 1, 0, the same summary; rsum 2 * (25 + 100 + 100).
    assert m["t2i"] == {"r1": 25.0, "r5": 100.0, "r10": 100.0, "medr": 2.0, "meanr": 2.5}
    assert m["rsum"] == 450.0


def test_constant_scores_get_no_recall():
    caption_image = np.repeat(np.arange(10), 5)
    m = retrieval_metrics(np.zeros((10, 50)), caption_image)
    assert m["i2t"]["r1"] == 0.0 and m["t2i"]["r1"] == 0.0
    assert m["i2t"]["meanr"] == 45 + 1 and m["t2i"]["meanr"] == 9 + 1


def test_fold_protocol_averages_independent_folds():
    rng = np.random.default_rng(0)
    n_img, per = 20, 5
    caption_image = np.repeat(np.arange(n_img), per)
    scores = rng.standard_normal((n_img, n_img * per))
    got = fold_metrics(scores, caption_image, fold_size=5)
    folds = []
    for f in range(4):
        imgs = np.arange(5 * f, 5 * f + 5)
        caps = np.arange(25 * f, 25 * f + 25)
        folds.append(retrieval_metrics(scores[np.ix_(imgs, caps)], caption_image[caps] - 5 * f))
    for d in ("i2t", "t2i"):
        for k in ("r1", "r5", "r10", "medr", "meanr"):
            assert got[d][k] == pytest.approx(np.mean([f[d][k] for f in folds]))
    assert got["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))
    # Scores outside a fold must not matter: a huge cross-fold score changes nothing.
    scores2 = scores.copy()
    scores2[0, 25:] = 100.0
    assert fold_metrics(scores2, caption_image, fold_size=5)["rsum"] == pytest.approx(got["rsum"])
    assert retrieval_metrics(scores2, caption_image)["rsum"] != retrieval_metrics(scores, caption_image)["rsum"]


def test_fold_protocol_on_a_hand_made_case():
    # 4 images, one caption each, folds of 2. Fold 1 scores perfectly (rsum 600). Fold 2:
    # [[0, 1], [0, 1]]: image 2's own caption is beaten (i2t ranks 1, 0); both captions tie with
    # the other image, and ties count against (t2i ranks 1, 1): rsum 50+100+100 + 0+100+100 = 450.
    # Cross-fold scores are huge and must be ignored.
    scores = np.full((4, 4), 100.0)
    scores[:2, :2] = np.eye(2)
    scores[2:, 2:] = [[0.0, 1.0], [0.0, 1.0]]
    got = fold_metrics(scores, np.arange(4), fold_size=2)
    assert [f["rsum"] for f in got["folds"]] == [600.0, 450.0]
    assert got["rsum"] == 525.0
    # medr per fold: i2t floor(median(0, 0)) + 1 = 1 and floor(median(1, 0)) + 1 = 1; t2i 1 and 2
    assert got["i2t"] == {"r1": 75.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.25}
    assert got["t2i"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0, "medr": 1.5, "meanr": 1.5}


def test_fold_protocol_refuses_partial_folds():
    with pytest.raises(ValueError):
        fold_metrics(np.zeros((7, 7)), np.arange(7), fold_size=5)


@pytest.mark.parametrize("chunk", [1, 3, 2048])
def test_chunked_ranks_and_top_k_equal_the_whole_matrix_computation(chunk):
    """i2t_ranks / t2i_ranks / top_k_rows work `chunk` rows or columns at a time (bounded
    temporaries at COCO 5K); the results must be those of one pass over the matrix, ties included."""
    from teranprep.teran.metrics import top_k_rows
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (7, 17)).astype(np.float32)  # many ties
    caption_image = rng.integers(0, 7, 17)
    caption_image[:7] = np.arange(7)  # every image owns a caption
    own = caption_image[None, :] == np.arange(7)[:, None]
    best_own = np.where(own, scores, -np.inf).max(axis=1)
    want_i2t = [int(((scores[i] >= best_own[i]) & ~own[i]).sum()) for i in range(7)]
    want_t2i = [int(sum(scores[j, c] >= scores[caption_image[c], c] for j in range(7) if j != caption_image[c]))
                for c in range(17)]
    assert i2t_ranks(scores, caption_image, chunk=chunk).tolist() == want_i2t
    assert t2i_ranks(scores, caption_image, chunk=chunk).tolist() == want_t2i
    for m, k in ((scores, 5), (scores.T, 5), (scores, 40)):
        want = [sorted(range(m.shape[1]), key=lambda j: (-m[i, j], j))[:k] for i in range(m.shape[0])]
        assert top_k_rows(m, k, chunk=chunk).tolist() == want


@pytest.mark.parametrize("seed", range(4))
def test_partition_top_k_is_the_stable_argsort_cut_at_k(seed):
    """stable_top_k (a partition, then a sort of k) against the full stable argsort it replaces,
    on rows of distinct values, of heavy ties (across the k-th place too), with NaN, +-0 and inf."""
    from teranprep.teran.metrics import stable_top_k
    rng = np.random.default_rng(seed)
    rows = [rng.standard_normal((50, 300)),                       # distinct: the partition path
            rng.integers(0, 6, (50, 300)).astype(np.float64),      # ties everywhere
            np.round(rng.standard_normal((50, 300)), 1)]           # some ties at the k-th place
    odd = rng.standard_normal((6, 300))
    odd[0, rng.choice(300, 40, replace=False)] = np.nan            # NaN sorts last
    odd[1, :] = np.nan
    odd[2, :150] = 0.0
    odd[2, 150:] = -0.0                                            # -0 == 0: column order decides
    odd[3, rng.choice(300, 5, replace=False)] = -np.inf
    odd[4, :] = 1.0                                                # a constant row
    odd[5, :3] = np.nan
    rows.append(odd)
    for keys in rows:
        for k in (1, 10, 25, 74, 75, 299, 300, 400):
            want = np.argsort(keys, axis=1, kind="stable")[:, :min(k, keys.shape[1])]
            got = stable_top_k(keys, k)
            assert got.dtype == np.int64 and np.array_equal(got, want), k
    assert stable_top_k(np.empty((0, 5)), 3).shape == (0, 3)
