"""Word-to-region alignment of one caption and one image: for each word piece, its best region."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import PrepError


def word_region_alignment(model, regions, caption_ids: list[int]):
    """[(token position, best region index 0-based among the image's regions, cosine)] for every
    token between [CLS] and [SEP]."""
    feats = np.asarray(regions.features, dtype=np.float32)
    n = len(feats)
    if n == 0:
        raise PrepError(f"{regions.image_key}: the image has no regions to align to")
    f = torch.zeros(1, n + 1, feats.shape[1])
    b = torch.zeros(1, n + 1, 4)
    f[0, 1:] = torch.from_numpy(feats)
    b[0, 1:] = torch.from_numpy(np.asarray(regions.boxes, dtype=np.float32))
    sizes = torch.tensor([[float(regions.width), float(regions.height)]])
    ids = torch.tensor([caption_ids])
    with torch.no_grad():
        reg = model.encode_images(f, b, sizes, torch.tensor([n + 1]))[0, 1:]
        words = model.encode_captions(ids, torch.tensor([len(caption_ids)]))[0]
        sims = words @ reg.T  # (W, n)
    best = sims.max(dim=1)
    return [(pos, int(best.indices[pos]), float(best.values[pos])) for pos in range(1, len(caption_ids) - 1)]
