"""Encoding a split once and scoring every image against every caption in bounded blocks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .alignment import alignment_scores, region_keep_mask, word_keep_mask
from .data import CaptionDataset, ImageDataset, SplitData, make_loader
from .precision import autocast, compute_dtype


@dataclass
class EncodedSplit:
    regions: torch.Tensor         # (Ni, R, E) padded unit vectors (slot 0 included)
    region_lengths: torch.Tensor  # (Ni,)
    words: torch.Tensor           # (Nc, W, E)
    word_lengths: torch.Tensor    # (Nc,)


class _PaddedRows:
    """Encoder outputs written batch by batch, in order, into one zero-padded (N, W, E) tensor:
    no list of batches held beside the result (at COCO 5K in fp32, 723 MB of regions held twice
    while they were concatenated). W starts at `width` and widens, once per wider batch, if a
    batch is wider still."""

    def __init__(self, n: int, dtype, width: int = 0):
        self.n, self.dtype, self.width, self.rows, self.tensor = n, dtype, width, 0, None

    def put(self, out: torch.Tensor) -> None:
        b, w, e = out.shape
        if self.tensor is None:
            self.tensor = torch.zeros(self.n, max(self.width, w), e, dtype=self.dtype)
        elif w > self.tensor.shape[1]:
            wider = torch.zeros(self.n, w, e, dtype=self.dtype)
            wider[:self.rows, :self.tensor.shape[1]] = self.tensor[:self.rows]
            self.tensor = wider
        self.tensor[self.rows:self.rows + b, :w] = out.to(self.dtype).cpu()
        self.rows += b

    def result(self) -> torch.Tensor:
        return self.tensor if self.tensor is not None else torch.zeros(0, self.width, 0, dtype=self.dtype)


@torch.no_grad()
def encode_split(model, split: SplitData, store, *, batch_size: int = 64, device="cpu",
                 max_regions: int | None = None, num_workers: int = 0,
                 dtype=None, precision: str = "fp32") -> EncodedSplit:
    """Region sets of the split's images (image_keys order) and word sets of its captions (row order).

    `precision` bf16 runs the encoders under bf16 autocast and keeps the (fp32-normalised) token
    vectors in bf16, which is what score_matrix multiplies; `dtype` overrides the kept dtype."""
    regions, rlens = encode_images(model, split.image_keys, store, batch_size=batch_size, device=device,
                                   max_regions=max_regions, num_workers=num_workers, dtype=dtype,
                                   precision=precision)
    words, wlens = encode_captions(model, split.captions["input_ids"], batch_size=batch_size, device=device,
                                   num_workers=num_workers, dtype=dtype, precision=precision)
    return EncodedSplit(regions, rlens, words, wlens)


@torch.no_grad()
def encode_images(model, keys, store, *, batch_size: int = 64, device="cpu", max_regions: int | None = None,
                  num_workers: int = 0, dtype=None, precision: str = "fp32"):
    """-> (regions (Ni, R, E) padded, lengths (Ni,)) of `keys`, as encode_split holds them."""
    model.eval()
    dtype = compute_dtype(precision) if dtype is None else dtype
    keys = list(keys)
    regions, rlens = _PaddedRows(len(keys), dtype), []
    for batch in make_loader(ImageDataset(keys, store, max_regions), batch_size=batch_size,
                             num_workers=num_workers):
        with autocast(device, precision):
            out = model.encode_images(batch["features"].to(device), batch["boxes"].to(device),
                                      batch["sizes"].to(device), batch["region_lengths"].to(device))
        regions.put(out)
        rlens.append(batch["region_lengths"])
    return regions.result(), torch.cat(rlens) if rlens else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def encode_captions(model, input_ids, *, batch_size: int = 64, device="cpu", num_workers: int = 0,
                    dtype=None, precision: str = "fp32"):
    """-> (words (Nc, W, E) padded to the longest of these captions, lengths (Nc,)), each batch
    written straight into the padded result (_PaddedRows; W is known before encoding)."""
    model.eval()
    dtype = compute_dtype(precision) if dtype is None else dtype
    wlens = torch.tensor([len(x) for x in input_ids], dtype=torch.long)
    words = _PaddedRows(len(input_ids), dtype, width=int(wlens.max()) if len(wlens) else 0)
    for batch in make_loader(CaptionDataset(input_ids), batch_size=batch_size, num_workers=num_workers):
        with autocast(device, precision):
            out = model.encode_captions(batch["input_ids"].to(device), batch["word_lengths"].to(device))
        words.put(out)
    return words.result(), wlens


@torch.no_grad()
def score_matrix(regions: torch.Tensor, region_lengths: torch.Tensor, words: torch.Tensor,
                 word_lengths: torch.Tensor, *, mode: str = "MrSw", drop_tokens: str = "reference",
                 word_max_floor_zero: bool = True, image_block: int = 100, caption_block: int = 500,
                 device="cpu", precision: str | None = None, max_padding: float = 1.25) -> np.ndarray:
    """(Ni, Nc) float32 scores, computed block by block (captions grouped as caption_blocks
    says; `max_padding` inf: fixed blocks of `caption_block` captions sorted by length).

    The similarity GEMM runs in the dtype of `precision` (fp32 | bf16; None: the inputs' own
    dtype); the scores are always summed in fp32 (alignment_scores).

    Each block holds image_block*R x caption_block*W similarities (e.g. 100x37 x 500x14 floats,
    ~100 MB): peak memory is the inputs, the output and one block, whatever the split's size.
    """
    ni, nc = regions.shape[0], words.shape[0]
    dtype = regions.dtype if precision is None else compute_dtype(precision)
    out = np.empty((ni, nc), dtype=np.float32)
    rmask_all = region_keep_mask(region_lengths, regions.shape[1])
    wmask_all = word_keep_mask(word_lengths, words.shape[1], drop_tokens)
    for cols, w0, w1 in caption_blocks(wmask_all, caption_block, max_padding):
        out_cols = cols if isinstance(cols, slice) else cols.numpy()
        blk_words = words[cols, w0:w1].to(device, dtype)
        wmask = wmask_all[cols, w0:w1].to(device)
        for i0 in range(0, ni, image_block):
            i1 = min(ni, i0 + image_block)
            # Slot 0 is never scored: leaving it out of the GEMM also spares a masking pass when
            # every image of the block has the same number of regions.
            rmax = max(int(region_lengths[i0:i1].max()), 2)
            rmask = rmask_all[i0:i1, 1:rmax].to(device)
            scores = alignment_scores(regions[i0:i1, 1:rmax].to(device, dtype), rmask,
                                      blk_words, wmask, mode, word_max_floor_zero)
            out[i0:i1, out_cols] = scores.float().cpu().numpy()
    return out


def caption_blocks(word_mask: torch.Tensor, caption_block: int, max_padding: float = 1.25):
    """(captions, first, end) of each caption block score_matrix multiplies: `captions` a slice or
    an index tensor, its words' columns first:end (the block's kept tokens).

    A block's GEMM is as wide as its longest kept caption, so the captions go into blocks in
    order of their last kept token, and a block ends at `caption_block` captions or before a
    caption that would make its work (captions x width) more than `max_padding` x its captions'
    own widths. COCO's 5K test (mean ~13.5 pieces, a few of 30-50 in every 2,000): in split
    order every 500-block was as wide as its longest caption; sorted into fixed blocks of 500,
    the last block of each 2,000 still was (~1.7x the work); with the bound, the few long ones
    make a small block of their own. Captions already in that order keep their slices (no copy).
    """
    nc, w = word_mask.shape
    positions = torch.arange(1, w + 1)
    last = (word_mask * positions).amax(1) if w else torch.zeros(nc, dtype=torch.long)  # 0: none kept
    first = torch.where(word_mask, positions - 1, w).amin(1) if w else last
    order = torch.argsort(last, stable=True)
    in_order = bool((order == torch.arange(nc)).all())
    base = int(first.min()) if nc else 0
    widths = (last[order] - base).clamp(min=1).tolist()  # ascending
    for c0, c1 in padded_runs(widths, caption_block, max_padding):
        cols = slice(c0, c1) if in_order else order[c0:c1]
        end = int(last[cols].max())
        start = int(first[cols].min())
        yield (cols, start, end) if end > start else (cols, 0, 1)


def padded_runs(widths, most: int, max_padding: float = 1.25):
    """(start, end) runs of `widths` (ascending): each at most `most` long, and ending before an
    item that would make the run's padded size (items x the widest) more than `max_padding` x
    the sum of its own widths."""
    n, c0 = len(widths), 0
    while c0 < n:
        c1, useful = c0 + 1, widths[c0]
        while c1 < n and c1 - c0 < most and (c1 - c0 + 1) * widths[c1] <= max_padding * (useful + widths[c1]):
            useful += widths[c1]
            c1 += 1
        yield c0, c1
        c0 = c1


def model_score_matrix(model, encoded: EncodedSplit, **kwargs) -> np.ndarray:
    al = model.config["alignment"]
    return score_matrix(encoded.regions, encoded.region_lengths, encoded.words, encoded.word_lengths,
                        mode=al["mode"], drop_tokens=al["drop_tokens"],
                        word_max_floor_zero=al["word_max_floor_zero"], **kwargs)
