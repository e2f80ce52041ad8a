"""Word-region alignment scores (MrSw, MwSr, symm), the token-dropping rule and the hinge loss.

Shapes (batch-first here; the reference is sequence-first, which changes nothing numerically):
    regions  (Ni, R, d)  L2-normalised, slot 0 = the global image vector
    region_lengths (Ni,) valid slots including slot 0
    words    (Nc, W, d)  L2-normalised, position 0 = [CLS]
    word_lengths (Nc,)   tokens including [CLS] and [SEP]
scores[i, c] is image i against caption c.
"""

from __future__ import annotations

import torch


def region_keep_mask(region_lengths: torch.Tensor, max_regions: int) -> torch.Tensor:
    """(Ni, R) True for the scored regions: slots 1..len-1 (the global slot 0 is never scored)."""
    pos = torch.arange(max_regions, device=region_lengths.device)
    return (pos[None, :] >= 1) & (pos[None, :] < region_lengths[:, None])


def word_keep_mask(word_lengths: torch.Tensor, max_words: int, rule: str = "reference") -> torch.Tensor:
    """(Nc, W) True for the scored tokens.

    reference: [CLS], the last word piece and [SEP] are dropped, as the reference's
               s_seq[:, 1:-2] with s_len - 3 does (it usually removes the final '.').
    special:   only [CLS] and [SEP] are dropped.
    none:      every token is scored.
    """
    pos = torch.arange(max_words, device=word_lengths.device)[None, :]
    lengths = word_lengths[:, None]
    if rule == "reference":
        return (pos >= 1) & (pos < lengths - 2)
    if rule == "special":
        return (pos >= 1) & (pos < lengths - 1)
    if rule == "none":
        return pos < lengths
    raise ValueError(f"unknown token-dropping rule {rule!r}")


def alignment_scores(regions: torch.Tensor, region_mask: torch.Tensor, words: torch.Tensor,
                     word_mask: torch.Tensor, mode: str = "MrSw",
                     word_max_floor_zero: bool = True) -> torch.Tensor:
    """(Ni, Nc) alignment scores from one GEMM over every (region, word) pair of the block.

    MrSw: sum over kept words of the max over kept regions of <region, word>.
    MwSr: sum over kept regions of the max over kept words; with `word_max_floor_zero` that max
          is floored at 0, which is what the reference's evaluation computes (it zero-pads every
          caption to 88 tokens before the max). symm: MrSw + MwSr.
    The similarities (and their maxima) are in the inputs' dtype (bf16 under --precision bf16),
    the sums that make the scores in fp32. The max over regions is never floored: the reference's images all have the same number of
    regions, so its zero padding never reaches that max; masking keeps a block's scores
    independent of which other images share it.
    """
    ni, r, d = regions.shape
    nc, w, _ = words.shape
    # One (Ni*R) x (Nc*W) matrix product: never a per-caption copy of the regions.
    sims = (regions.reshape(ni * r, d) @ words.reshape(nc * w, d).T).view(ni, r, nc, w)
    acc = torch.promote_types(sims.dtype, torch.float32)  # bf16/fp16 sums accumulate in fp32
    total = None
    if mode in ("MrSw", "symm"):
        if bool(region_mask.all()):
            best_region = sims.amax(dim=1)  # (Ni, Nc, W)
        else:
            neg = torch.finfo(sims.dtype).min
            best_region = sims.masked_fill(~region_mask[:, :, None, None], neg).amax(dim=1)
            best_region = best_region.masked_fill(~region_mask.any(1)[:, None, None], 0)
        # The max is exact in any dtype; the sum over words (the score) accumulates in fp32.
        if not bool(word_mask.all()):
            best_region = best_region.masked_fill(~word_mask[None], 0)
        total = best_region.sum(dim=2, dtype=acc)
    if mode in ("MwSr", "symm"):
        if word_max_floor_zero:
            best_word = sims.masked_fill(~word_mask[None, None], 0).amax(dim=3).clamp(min=0)
        else:
            neg = torch.finfo(sims.dtype).min
            best_word = sims.masked_fill(~word_mask[None, None], neg).amax(dim=3)
            best_word = best_word.masked_fill(~word_mask.any(1)[None, None, :], 0)
        if not bool(region_mask.all()):
            best_word = best_word.masked_fill(~region_mask[:, :, None], 0)
        part = best_word.sum(dim=1, dtype=acc)  # (Ni, Nc)
        total = part if total is None else total + part
    if total is None:
        raise ValueError(f"unknown alignment mode {mode!r}")
    return total


def hinge_loss(scores: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """VSE++ hinge loss with the hardest negative in both directions, summed over the batch.

    scores[i, j]: image i vs caption j; the positives are on the diagonal.
    """
    positive = scores.diagonal()
    eye = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    cost_caption = (margin + scores - positive[:, None]).clamp(min=0).masked_fill(eye, 0)
    cost_image = (margin + scores - positive[None, :]).clamp(min=0).masked_fill(eye, 0)
    return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
