"""The shortlist head (ALADIN's matching head): one global vector per image and per caption.

Both sides take TERAN's own alignment-space token vectors (frozen), pass each token through a
small MLP, average the kept tokens and L2-normalise: score(I, C) = <g_I, g_C>. The head learns
from TERAN's alignment scores with ALADIN's ListNet distillation (teacher detached, student
temperature 6.0, rows and columns). kind "mean" is the parameter-free fallback: the normalised
mean of the token vectors themselves (what an index uses when no head was trained).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

DEFAULT_DIM = 256
DEFAULT_HIDDEN = 512
STUDENT_TEMPERATURE = 6.0


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) and (B, T) bool -> (B, d): the mean of the kept tokens (zero when none is kept)."""
    weight = mask.to(tokens.dtype)[..., None]
    return (tokens * weight).sum(1) / weight.sum(1).clamp(min=1.0)


class ShortlistHead(nn.Module):
    def __init__(self, embed_dim: int, dim: int = DEFAULT_DIM, hidden: int = DEFAULT_HIDDEN,
                 kind: str = "mlp"):
        super().__init__()
        if kind not in ("mlp", "mean"):
            raise ValueError(f"unknown shortlist head kind {kind!r}")
        self.kind, self.embed_dim = kind, int(embed_dim)
        self.dim = int(dim) if kind == "mlp" else int(embed_dim)
        self.hidden = int(hidden)
        if kind == "mlp":
            self.image = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
            self.text = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def _side(self, mlp, tokens, mask):
        tokens = tokens.float()
        if self.kind == "mlp":
            tokens = mlp(tokens)
        return F.normalize(masked_mean(tokens, mask), p=2, dim=-1)

    def image_vectors(self, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        return self._side(getattr(self, "image", None), regions, region_mask)

    def text_vectors(self, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        return self._side(getattr(self, "text", None), words, word_mask)

    def describe(self) -> dict:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "dim": self.dim, "hidden": self.hidden}

    def payload(self) -> dict:
        """What head.pt holds: tensors and plain values only (loads with weights_only=True)."""
        return {"format": "teranprep.shortlist-head", "head": self.describe(),
                "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_payload(cls, payload: dict) -> "ShortlistHead":
        h = payload["head"]
        head = cls(h["embed_dim"], h["dim"], h["hidden"], h["kind"])
        head.load_state_dict(payload["state"])
        return head.eval()


def listnet_loss(teacher: torch.Tensor, student: torch.Tensor,
                 temperature: float = STUDENT_TEMPERATURE) -> torch.Tensor:
    """ALADIN's ListNet distillation: cross-entropy between the row-wise softmax of the detached
    teacher scores and that of temperature * student scores, plus the same over columns."""
    teacher = teacher.detach()
    scaled = temperature * student

    def direction(dim: int) -> torch.Tensor:
        target = F.softmax(teacher, dim=dim)
        return -(target * torch.log(F.softmax(scaled, dim=dim) + 1e-10)).sum(dim=dim).mean()

    return direction(1) + direction(0)


def shortlist_recall(exhaustive, student, sizes, top: int = 10) -> dict:
    """For (Ni, Nc) exhaustive and student scores: the mean fraction of each caption's exhaustive
    top-`top` images that the student's top-N keeps, for every N in `sizes` (N capped at Ni)."""
    import numpy as np
    ni = exhaustive.shape[0]
    top = min(top, ni)
    best = np.argsort(-exhaustive, axis=0, kind="stable")[:top]  # (top, Nc)
    order = np.argsort(-student, axis=0, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order, np.arange(order.shape[1])[None, :]] = np.arange(ni)[:, None]
    ranks = np.take_along_axis(rank_of, best, axis=0)  # student rank of each exhaustive top image
    return {int(n): float(np.mean(ranks < min(int(n), ni))) for n in sizes}
