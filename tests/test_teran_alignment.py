"""Alignment scores, token dropping and the hinge loss against direct loop implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teranprep.teran.alignment import (alignment_scores, hinge_loss, region_keep_mask,
                                       word_keep_mask)
from teranprep.teran.scoring import score_matrix


def _unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _loop_scores(regions, rlens, words, wlens, mode, drop, floor_zero):
    """Direct per-pair loops over the kept regions (1..len-1) and kept words."""
    ni, nc = regions.shape[0], words.shape[0]
    out = np.zeros((ni, nc))
    for i in range(ni):
        reg = [regions[i, r].numpy() for r in range(1, int(rlens[i]))]
        for c in range(nc):
            n = int(wlens[c])
            idx = {"reference": range(1, n - 2), "special": range(1, n - 1), "none": range(n)}[drop]
            wds = [words[c, w].numpy() for w in idx]
            mrsw = sum(max(float(r @ w) for r in reg) for w in wds) if reg else 0.0
            if floor_zero:
                mwsr = sum(max([0.0] + [float(r @ w) for w in wds]) for r in reg)
            else:
                mwsr = sum(max(float(r @ w) for w in wds) for r in reg) if wds else 0.0
            out[i, c] = {"MrSw": mrsw, "MwSr": mwsr, "symm": mrsw + mwsr}[mode]
    return out


@pytest.mark.parametrize("mode", ["MrSw", "MwSr", "symm"])
@pytest.mark.parametrize("floor_zero", [True, False])
@pytest.mark.parametrize("drop", ["reference", "special", "none"])
def test_alignment_scores_match_direct_loop_with_padding(mode, floor_zero, drop):
    regions, words = _unit(5, 7, 6, seed=1), _unit(4, 9, 6, seed=2)
    rlens = torch.tensor([7, 3, 5, 2, 6])   # padded images (slot 0 counted)
    wlens = torch.tensor([9, 5, 6, 7])      # padded captions ([CLS]/[SEP] counted)
    # Padded positions hold garbage: they must not leak into any score.
    for i, n in enumerate(rlens):
        regions[i, n:] = 5.0
    for c, n in enumerate(wlens):
        words[c, n:] = -5.0
    got = alignment_scores(regions, region_keep_mask(rlens, 7), words, word_keep_mask(wlens, 9, drop),
                           mode, floor_zero)
    want = _loop_scores(regions, rlens, words, wlens, mode, drop, floor_zero)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_reference_token_rule_drops_cls_last_piece_and_sep():
    mask = word_keep_mask(torch.tensor([6, 4]), 6, "reference")
    assert mask.tolist() == [[False, True, True, True, False, False],
                             [False, True, False, False, False, False]]


@pytest.mark.parametrize("mode", ["MrSw", "MwSr", "symm"])
def test_blocked_score_matrix_equals_one_block(mode):
    regions, words = _unit(23, 6, 8, seed=3).float(), _unit(31, 8, 8, seed=4).float()
    rlens = torch.randint(2, 7, (23,), generator=torch.Generator().manual_seed(5))
    wlens = torch.randint(4, 9, (31,), generator=torch.Generator().manual_seed(6))
    whole = alignment_scores(regions, region_keep_mask(rlens, 6), words,
                             word_keep_mask(wlens, 8, "reference"), mode, True).numpy()
    blocked = score_matrix(regions, rlens, words, wlens, mode=mode, image_block=4, caption_block=7)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)


def test_caption_blocks_group_captions_by_length_and_scores_stay_in_their_columns():
    """One long caption among short ones: blocked in split order, every block it lands in is as
    wide as it; caption_blocks sorts by length and bounds each block's padding, so the long ones
    make a block of their own and the work (sum of block size x width) is below both split order
    and fixed blocks of the sorted captions. The scores still equal the one-block computation and
    land in each caption's own column."""
    from teranprep.teran.scoring import caption_blocks
    g = torch.Generator().manual_seed(7)
    wlens = torch.randint(6, 9, (40,), generator=g)
    wlens[[3, 17, 30]] = 30  # three long captions, in three different split-order blocks of 10
    wmask = word_keep_mask(wlens, 30, "reference")
    blocks = list(caption_blocks(wmask, 10))
    covered = torch.cat([torch.arange(40)[cols] for cols, _, _ in blocks])
    assert sorted(covered.tolist()) == list(range(40))  # every caption once
    kept = wmask.sum(1)  # reference rule: kept tokens 1 .. len-3, so a caption's width is its count
    for cols, start, end in blocks:  # each block's columns hold all its kept tokens
        assert not wmask[cols][:, :start].any() and not wmask[cols][:, end:].any()
        n = len(torch.arange(40)[cols])
        assert 1 <= n <= 10
        assert n * (end - start) <= 1.25 * int(kept[cols].sum())  # the padding bound
    long_block = [torch.arange(40)[cols].tolist() for cols, _, _ in blocks if 3 in torch.arange(40)[cols]]
    assert long_block == [[3, 17, 30]]  # the long ones alone, in split order
    work = sum(len(torch.arange(40)[cols]) * (end - start) for cols, start, end in blocks)
    kept_end = (wlens - 2).sort().values
    fixed = sum(len(kept_end[i:i + 10]) * (int(kept_end[i:i + 10].max()) - 1) for i in range(0, 40, 10))
    split_order = sum(10 * (int((wlens[i:i + 10] - 2).max()) - 1) for i in range(0, 40, 10))
    assert work <= 1.25 * int(kept.sum()) < fixed < split_order

    regions, words = _unit(9, 5, 8, seed=8).float(), _unit(40, 30, 8, seed=9).float()
    rlens = torch.randint(2, 6, (9,), generator=torch.Generator().manual_seed(10))
    whole = alignment_scores(regions, region_keep_mask(rlens, 5), words, wmask, "symm", True).numpy()
    blocked = score_matrix(regions, rlens, words, wlens, mode="symm", image_block=4, caption_block=10)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-5)
    in_order = torch.argsort(wlens, stable=True)  # already sorted: the same scores, sliced blocks
    again = score_matrix(regions, rlens, words[in_order], wlens[in_order], mode="symm", image_block=4,
                         caption_block=10)
    np.testing.assert_allclose(again, whole[:, in_order.numpy()], rtol=1e-5, atol=1e-5)


def test_hinge_loss_matches_hand_computation():
    s = torch.tensor([[0.9, 0.8, 0.1],
                      [0.3, 0.5, 0.6],
                      [0.2, 0.0, 0.7]])
    # Rows (image -> hardest caption): max(0.2+0.8-0.9, 0.2+0.1-0.9)=0.1; 0.2+0.6-0.5=0.3;
    # 0.2+0.2-0.7<0 -> 0. Columns (caption -> hardest image): 0.2+0.3-0.9<0 -> 0;
    # 0.2+0.8-0.5=0.5; 0.2+0.6-0.7=0.1.
    assert hinge_loss(s, 0.2).item() == pytest.approx(0.1 + 0.3 + 0.0 + 0.0 + 0.5 + 0.1)


def test_hinge_loss_gradient_reaches_only_hardest_negatives():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.3, 0.5, 0.6], [0.2, 0.0, 0.7]], requires_grad=True)
    hinge_loss(s, 0.2).backward()
    want = torch.tensor([[-1.0, 2.0, 0.0],     # s01 hardest for row 0 and column 1
                         [0.0, -2.0, 2.0],     # s12 hardest for row 1 and column 2
                         [0.0, 0.0, -1.0]])
    assert torch.equal(s.grad, want)


def test_padded_rows_equal_the_batches_zero_padded_and_stacked_even_when_a_later_batch_is_wider():
    """encode_images/encode_captions write each batch into one padded tensor (_PaddedRows): the
    result is the batches zero-padded to the widest and stacked, in order and in the target
    dtype, whether the width was known up front or a later batch widens it."""
    from teranprep.teran.scoring import _PaddedRows
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, w, 4, generator=g) for w in (3, 5, 2)]
    expected = torch.zeros(6, 5, 4)
    for i, b in enumerate(batches):
        expected[2 * i:2 * i + 2, :b.shape[1]] = b
    for width, dtype in ((0, torch.float32), (5, torch.float32), (0, torch.bfloat16)):
        rows = _PaddedRows(6, dtype, width=width)
        for b in batches:
            rows.put(b)
        got = rows.result()
        assert got.dtype == dtype and torch.equal(got, expected.to(dtype))
    assert _PaddedRows(0, torch.float32, width=2).result().shape == (0, 2, 0)


def test_padded_runs_cover_every_item_once_within_the_count_and_padding_bounds():
    """padded_runs (eval's caption chunks, caption_blocks' blocks): consecutive runs covering
    every item once, at most `most` long, each padded to its widest within max_padding x its
    own widths; a long item makes a run of its own."""
    from teranprep.teran.scoring import padded_runs
    assert list(padded_runs([10] * 5 + [50], 4)) == [(0, 4), (4, 5), (5, 6)]
    widths = sorted(np.random.default_rng(0).integers(8, 20, 500).tolist() + [35, 48, 50])
    runs = list(padded_runs(widths, 64, 1.25))
    assert [r[0] for r in runs[1:]] == [r[1] for r in runs[:-1]] and runs[0][0] == 0 and runs[-1][1] == 503
    for a, b in runs:
        assert b - a <= 64 and (b - a) * max(widths[a:b]) <= 1.25 * sum(widths[a:b])
    assert not any(min(widths[a:b]) < 20 <= 35 <= max(widths[a:b]) for a, b in runs)  # the long tail is apart
