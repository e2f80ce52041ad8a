"""ROUGE-L relevance and NDCG@25 as mesnico/TERAN's evaluate_utils computes them: hand-computed
cases, a direct loop, the cached matrix against the per-pair function, resume, dask, eval."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from teran_fixtures import make_tiny_bert, random_dataset, tiny_config, one_thread  # noqa: F401 (autouse)
from teranprep.errors import PrepError
from teranprep.teran.relevance import (TokenizedCaptions, fold_ndcg, lcs_length, mean_ndcg,
                                       ndcg_from_ranking, ndcg_many, rouge_l, rouge_l_rows)

B2 = 1.2 ** 2


def f_beta(p, r):
    return (1 + B2) * p * r / (r + B2 * p)


# (candidate, references, ROUGE-L worked out by hand)
HAND_CASES = [
    ("a dog runs", ["a dog runs"], 1.0),
    ("a cat sleeps", ["the dog runs", "two birds"], 0.0),                        # no overlap
    ("dog", ["a dog runs"], f_beta(1 / 1, 1 / 3)),                               # one word
    ("dog", ["cat"], 0.0),                                                       # one word, none
    ("the the the", ["the cat the"], 2 / 3),                                     # repeats: LCS 2
    ("the cat", ["the the the the"], f_beta(1 / 2, 1 / 4)),                      # repeats in ref
    ("a b", ["b a"], 0.5),                                                       # tied LCS paths
    # precision and recall are maximised separately, over different references: P 4/4, R 2/2
    ("a b c d", ["a b", "a b c d e f g h"], 1.0),
    ("A Dog", ["a dog"], 1.0),                                                   # lower-cased
    ("a  dog", ["a dog"], f_beta(2 / 3, 2 / 2)),                                 # split(" "): '' token
    # LCS 3 with the first reference (P 3/4), 1 with the second (R 1/1)
    ("man on a horse", ["a man riding a horse", "horse"], f_beta(3 / 4, 1 / 1)),
]


@pytest.mark.parametrize("candidate, references, want", HAND_CASES)
def test_rouge_l_matches_hand_computed_values(candidate, references, want):
    assert rouge_l(candidate, references) == pytest.approx(want, abs=1e-12)


def test_matrix_rows_match_hand_computed_values():
    captions, owner = [], []
    for i, (candidate, references, _) in enumerate(HAND_CASES):
        captions += [candidate] + references
        owner += [2 * i] + [2 * i + 1] * len(references)  # candidate alone on image 2i
    refs = TokenizedCaptions(captions, np.array(owner), 2 * len(HAND_CASES))
    rows = [owner.index(2 * i) for i in range(len(HAND_CASES))]
    matrix = rouge_l_rows(refs, rows)
    for i, (_, _, want) in enumerate(HAND_CASES):
        assert matrix[i, 2 * i + 1] == pytest.approx(want, abs=1e-6)  # float32
        assert matrix[i, 2 * i] == pytest.approx(1.0)                 # itself


def test_lcs_by_hand_and_bit_parallel_equals_dynamic_programme_beyond_64_tokens():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS's example
    assert lcs_length([], ["a"]) == 0
    rng = np.random.default_rng(1)
    words = ["w%d" % i for i in range(6)]
    captions = [" ".join(rng.choice(words, int(n))) for n in rng.integers(1, 90, 40)]
    refs = TokenizedCaptions(captions, np.arange(40), 40)
    matrix = rouge_l_rows(refs, range(40))  # rows longer than 64 tokens take the DP path
    assert max(len(c.split(" ")) for c in captions) > 64
    for i in range(40):
        for j in range(40):
            assert matrix[i, j] == pytest.approx(rouge_l(captions[i], [captions[j]]), abs=1e-6)


def _dcg(relevance, ranking):
    return sum((2 ** relevance[doc] - 1) / math.log2(rank + 2) for rank, doc in enumerate(ranking))


def test_ndcg_hand_computed():
    relevance = np.array([0.5, 1.0, 0.0, 0.25])
    # ranked 0, 1, 2: (2^.5-1)/log2 2 + (2^1-1)/log2 3 + 0; ideal 1, 0.5, 0.25 over the same ranks
    dcg = (math.sqrt(2) - 1) / 1 + 1 / math.log2(3)
    ideal = 1 / 1 + (math.sqrt(2) - 1) / math.log2(3) + (2 ** 0.25 - 1) / 2
    assert ndcg_from_ranking(relevance, [0, 1, 2]) == pytest.approx(dcg / ideal, rel=1e-12)
    assert dcg / ideal == pytest.approx(0.770787, abs=1e-6)
    assert ndcg_from_ranking(relevance, [1, 0, 3]) == pytest.approx(1.0)
    assert ndcg_from_ranking(np.zeros(4), [0, 1]) == 0.0   # nothing relevant: 0, not 0/0


def test_ndcg_of_ranked_lists_against_a_direct_loop():
    rng = np.random.default_rng(0)
    n_images, n_captions = 30, 70
    relevance = rng.random((n_captions, n_images)) ** 3
    relevance[rng.random(relevance.shape) < 0.3] = 0
    relevance[:, 3] = 0  # an image no caption is relevant to: its i2t NDCG is 0 and skipped
    scores = rng.standard_normal((n_images, n_captions)).astype(np.float32)
    loops = {"i2t": [], "t2i": []}
    for image in range(n_images):
        ranking = sorted(range(n_captions), key=lambda c: -scores[image, c])[:25]
        column = relevance[:, image]
        best = _dcg(np.sort(column)[::-1], range(25))
        loops["i2t"].append(0.0 if best == 0 else _dcg(column, ranking) / best)
    for caption in range(n_captions):
        ranking = sorted(range(n_images), key=lambda i: -scores[i, caption])[:25]
        best = _dcg(np.sort(relevance[caption])[::-1], range(25))
        loops["t2i"].append(0.0 if best == 0 else _dcg(relevance[caption], ranking) / best)
    top = np.argsort(-scores.T, axis=1, kind="stable")[:, :25]
    np.testing.assert_allclose(ndcg_many(relevance, top), loops["t2i"], rtol=1e-12)
    got = fold_ndcg(relevance.astype(np.float32), scores, chunk=7)
    import teranprep.teran.relevance as relevance_module
    for values in (50, 1):  # the default chunks (as many rows as fit NDCG_CHUNK_VALUES), made small
        relevance_module.NDCG_CHUNK_VALUES, before = values, relevance_module.NDCG_CHUNK_VALUES
        try:
            again = fold_ndcg(relevance.astype(np.float32), scores)
            assert again == {d: pytest.approx(v, rel=1e-12) for d, v in got.items()}
        finally:
            relevance_module.NDCG_CHUNK_VALUES = before
    assert loops["i2t"][3] == 0
    assert got["i2t"] == pytest.approx(np.mean([v for v in loops["i2t"] if v != 0]), rel=1e-6)
    assert got["t2i"] == pytest.approx(np.mean(loops["t2i"]), rel=1e-6)
    assert mean_ndcg(np.array([0.0, 0.5, 1.0]), "i2t") == 0.75   # the reference skips zeros
    assert mean_ndcg(np.array([0.0, 0.5, 1.0]), "t2i") == 0.5    # ... only image-to-text
    assert mean_ndcg(np.zeros(3), "i2t") is None


WORDS = ("a man woman dog cat riding sitting on the of with red blue table street horse bike "
         "two people next to grass field").split()


def _word_captions(splits, seed=0):
    """Replace the fixture's numeric raw captions by word captions of COCO-like lengths."""
    rng = np.random.default_rng(seed)
    for path in sorted(splits.glob("*.parquet")):
        frame = pd.read_parquet(path)
        frame["raw"] = [" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))).capitalize() + "."
                        for _ in range(len(frame))]
        frame.to_parquet(path, index=False)


@pytest.fixture
def splits(tmp_path, make_features):
    splits, features = random_dataset(tmp_path, make_features, n_train=4, n_val=9, caps=3)
    _word_captions(splits)
    return splits


def _per_pair_matrix(path):
    from teranprep.pipeline.relevance import split_captions
    captions, owner, keys = split_captions(path)
    refs = [[c for c, o in zip(captions, owner) if o == j] for j in range(len(keys))]
    return np.array([[rouge_l(c, refs[j]) for j in range(len(keys))] for c in captions])


def test_cached_matrix_matches_the_per_pair_function_and_is_reused(tmp_path, splits):
    from teranprep.manifests.relevance import RELEVANCE_FORMAT
    from teranprep.pipeline.relevance import ensure_rouge_matrix
    messages = []
    path = ensure_rouge_matrix(splits, "test", block_rows=4, echo=messages.append)
    assert path.parent == tmp_path / "splits-relevance" and path.name == "test-rougeL.npy"
    want = _per_pair_matrix(splits / "test.parquet")
    got = np.fromfile(path, dtype=np.float32).reshape(want.shape)  # headerless, as the original
    rng = np.random.default_rng(0)
    sample = rng.integers(0, want.shape[0], 60), rng.integers(0, want.shape[1], 60)
    np.testing.assert_allclose(got[sample], want[sample], atol=1e-6)
    np.testing.assert_allclose(got, want, atol=1e-6)
    manifest = json.loads((path.parent / "manifest.json").read_text())
    assert manifest["format"] == RELEVANCE_FORMAT
    assert manifest["matrices"]["test-rougeL"]["shape"] == list(want.shape)
    assert not (path.parent / "test-rougeL.parts").exists()
    mtime = path.stat().st_mtime_ns
    messages.clear()
    assert ensure_rouge_matrix(splits, "test", echo=messages.append) == path
    assert path.stat().st_mtime_ns == mtime and messages == []  # cached: nothing recomputed
    with pytest.raises(PrepError, match="lies inside .* caption splits"):
        ensure_rouge_matrix(splits, "test", cache_dir=splits / "relevance")
    with pytest.raises(PrepError, match="lies inside .* region features"):
        ensure_rouge_matrix(splits, "test", cache_dir=tmp_path / "features" / "relevance")
    (splits / "manifest.json").write_text((splits / "manifest.json").read_text() + " ")
    with pytest.raises(PrepError, match="relevance of other splits"):
        ensure_rouge_matrix(splits, "test")


def test_interrupted_computation_resumes_from_its_completed_blocks(tmp_path, splits, monkeypatch):
    from teranprep.pipeline import relevance
    real = relevance.run_tasks_for_relevance

    def two_then_interrupt(tasks, **kwargs):
        real(tasks[:2], **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(relevance, "run_tasks_for_relevance", two_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        relevance.ensure_rouge_matrix(splits, "test", cache_dir=tmp_path / "rel", block_rows=4)
    blocks = sorted((tmp_path / "rel" / "test-rougeL.parts").glob("rows-*.npy"))
    assert len(blocks) == 2 and not (tmp_path / "rel" / "manifest.json").exists()
    monkeypatch.setattr(relevance, "run_tasks_for_relevance", real)
    messages = []
    path = relevance.ensure_rouge_matrix(splits, "test", cache_dir=tmp_path / "rel", block_rows=4,
                                         echo=messages.append)
    assert "5 of 7 row blocks" in messages[0]  # 27 captions in blocks of 4
    want = _per_pair_matrix(splits / "test.parquet")
    np.testing.assert_allclose(np.fromfile(path, np.float32).reshape(want.shape), want, atol=1e-6)


def test_dask_workers_write_the_same_matrix(tmp_path, splits):
    from teranprep.pipeline.relevance import ensure_rouge_matrix
    inline = ensure_rouge_matrix(splits, "test", cache_dir=tmp_path / "inline", block_rows=5)
    on_dask = ensure_rouge_matrix(splits, "test", cache_dir=tmp_path / "dask", block_rows=5, workers=2)
    # Element-wise IEEE operations and maxima only: equal bytes by construction, in any process.
    assert on_dask.read_bytes() == inline.read_bytes()


def test_eval_reports_ndcg_of_its_rankings_and_takes_original_relevance_files(tmp_path, splits):
    from teranprep.pipeline.evaluate import evaluate
    from teranprep.teran.checkpoint import load_model
    from teranprep.pipeline.train import train
    from teranprep.teran.data import load_split, open_features
    from teranprep.teran.metrics import fold_slices
    from teranprep.teran.scoring import encode_split, model_score_matrix

    run = tmp_path / "run"
    train(splits, tiny_config(make_tiny_bert(tmp_path / "bert"), epochs=1, val_every=100), run,
          stop_after=2, echo=lambda *_: None)
    model, _ = load_model(run)
    store = open_features(splits)
    data = load_split(splits, "test", store)
    scores = model_score_matrix(model, encode_split(model, data, store), image_block=100, caption_block=100)
    rouge = _per_pair_matrix(splits / "test.parquet")
    spice = np.random.default_rng(5).random(rouge.shape).astype(np.float32)
    spice_file = tmp_path / "coco-test-spice.npy"
    spice.tofile(spice_file)
    quiet = lambda *_: None  # noqa: E731
    got = evaluate(run, splits, relevance_files=[spice_file], echo=quiet)
    for measure, relevance in (("rougeL", rouge), ("spice", spice)):
        want = fold_ndcg(relevance, scores)
        for direction in ("i2t", "t2i"):
            assert got[direction][f"ndcg_{measure}"] == pytest.approx(want[direction], rel=1e-5)
    assert got["relevance"]["spice"] == {"file": str(spice_file), "given": True}
    # 1K protocol: each fold's relevance restricted to its images and their captions.
    folds = evaluate(run, splits, protocol="1k", fold_size=3, echo=quiet)
    per_fold = []
    for images in fold_slices(9, 3):
        caps = np.flatnonzero(np.isin(data.caption_image, images))
        per_fold.append(fold_ndcg(rouge[np.ix_(caps, images)], scores[np.ix_(images, caps)]))
    for direction in ("i2t", "t2i"):
        assert folds[direction]["ndcg_rougeL"] == pytest.approx(
            np.mean([f[direction] for f in per_fold]), rel=1e-5)
    short = tmp_path / "coco-test-rougeL.npy"
    rouge[:-1].astype(np.float32).tofile(short)
    with pytest.raises(PrepError, match=r"27 captions x 9 images"):
        evaluate(run, splits, relevance_files=[short], echo=quiet)
    with pytest.raises(PrepError, match="rougeL\\|spice"):
        evaluate(run, splits, relevance_files=[tmp_path / "relevance.bin"], echo=quiet)
