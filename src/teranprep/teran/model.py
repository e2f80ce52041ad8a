"""The TERAN model: region and word encoders into one joint space of L2-normalised vectors.

Image side (per image, R = 1 + regions, slot 0 a zero feature with a zero box, never masked):
    [feature (D) | x1/w, y1/h, x2/w, y2/h, area (5)] -> Linear(D+5, H), ReLU, Linear(H, H)
    -> image.layers transformer layers at H (key-padding mask on padded slots)
    -> Linear(H, E) -> model.joint_layers transformer layers at E -> L2 norm
Text side: BERT-family encoder (first text.layers layers) -> Linear(word_dim, E)
    -> model.joint_layers transformer layers at E (shared with the image ones when
    model.shared_transformer) -> L2 norm.
Tensors are batch-first: (B, S, dim). Transformer layers are post-norm, ReLU, as the reference.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .alignment import alignment_scores, region_keep_mask, word_keep_mask

DROP_LEVELS = 1 << 16  # a CPU dropout's keep test compares a uniform 16-bit draw


def cpu_dropout(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """Training-mode dropout of a CPU tensor: each element kept with probability 1 - p', scaled
    by 1 / (1 - p'), where p' is p rounded to a multiple of 2^-16 (0.1 -> 0.100006), so every
    output's expectation is its input exactly. The draws are 16-bit slices of random_() int64
    words from torch's generator (seeded, checkpointed and resumed like any other draw), where
    F.dropout's bernoulli_ draws a float per element: forward and backward ~4.3 ns an element
    against ~8.1 (benchmarks/bench_dropout.py), and the mask kept for backward is bool (1 byte
    an element, not a 4-byte float). A p too small or too close to 1 for 16 bits goes to
    F.dropout."""
    drop = round(p * DROP_LEVELS)
    if not 0 < drop < DROP_LEVELS:
        return F.dropout(x, p, True, inplace)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    keep = words.view(torch.int16)[:n].view(x.shape) >= drop - DROP_LEVELS // 2
    scale = DROP_LEVELS / (DROP_LEVELS - drop)
    return x.mul_(keep).mul_(scale) if inplace else x.mul(keep).mul_(scale)


class Dropout(nn.Dropout):
    """nn.Dropout (same p, inplace and no parameters) through cpu_dropout on CPU tensors; CUDA's
    fused kernel and eval mode are nn.Dropout's own."""

    def forward(self, x):
        if self.training and x.device.type == "cpu" and self.p > 0:
            return cpu_dropout(x, self.p, self.inplace)
        return super().forward(x)


def use_cpu_dropout(module: nn.Module) -> nn.Module:
    """Every plain nn.Dropout inside `module` replaced by Dropout (a text encoder's too)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace))
    return module


class EncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer (post-norm, ReLU, batch-first: the same parameters, names and
    initialisation) whose self-attention runs as one in-projection viewed as q, k and v, then
    scaled_dot_product_attention. nn.MultiheadAttention's own path selects q, k and v out of a
    transposed copy of that projection: in backward each select filled a zero tensor of all
    three (3 x 37 x 40 x 2048 at teran_coco's batch), ~1 s of a 6.5 s fp32 CPU step. Same
    formula (softmax(q k^T / sqrt(d) + mask) v, dropout on the attention weights when
    training); only the rounding and the dropout draws' order differ. Its dropout modules are
    Dropout (cpu_dropout on a CPU), the attention weights' dropout is scaled_dot_product_attention's
    own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_cpu_dropout(self)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if src_mask is not None or is_causal:
            raise ValueError("EncoderLayer takes a key-padding mask only")
        x = self.norm1(src + self._attention(src, src_key_padding_mask))
        return self.norm2(x + self._ff_block(x))

    def _attention(self, x, key_padding_mask):
        a = self.self_attn
        b, s, e = x.shape
        heads = a.num_heads
        q, k, v = F.linear(x, a.in_proj_weight, a.in_proj_bias).view(
            b, s, 3, heads, e // heads).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, S, d)
        mask = None
        if key_padding_mask is not None:  # True / -inf: a padded key, never attended to
            mask = (~key_padding_mask if key_padding_mask.dtype == torch.bool
                    else key_padding_mask.to(q.dtype))[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=a.dropout if self.training else 0.0)
        return self.dropout1(a.out_proj(out.transpose(1, 2).reshape(b, s, e)))


def _transformer(dim: int, heads: int, ffn: int, dropout: float, layers: int) -> nn.TransformerEncoder:
    layer = EncoderLayer(d_model=dim, nhead=heads, dim_feedforward=ffn,
                         dropout=dropout, activation="relu", batch_first=True)
    # No nested tensors: padded outputs stay computed (and masked later), train and eval agree.
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def box_vector(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """(B, R, 4) pixel boxes and (B, 2) width,height -> (B, R, 5) [x1, y1, x2, y2, area], all /w,h."""
    scale = torch.stack([sizes[:, 0], sizes[:, 1], sizes[:, 0], sizes[:, 1]], dim=1).to(boxes.dtype)
    norm = boxes / scale[:, None, :]
    area = (norm[..., 2] - norm[..., 0]) * (norm[..., 3] - norm[..., 1])
    return torch.cat([norm, area[..., None]], dim=-1)


class ImageEncoder(nn.Module):
    def __init__(self, feature_dim: int, hidden_dim: int, layers: int, heads: int, ffn: int,
                 dropout: float):
        super().__init__()
        self.box_mlp = nn.Sequential(nn.Linear(feature_dim + 5, hidden_dim), nn.ReLU(),
                                     nn.Linear(hidden_dim, hidden_dim))
        self.transformer = _transformer(hidden_dim, heads, ffn, dropout, layers)

    def forward(self, features, boxes5, padding_mask):
        x = self.box_mlp(torch.cat([features, boxes5], dim=-1))
        return self.transformer(x, src_key_padding_mask=padding_mask)


class TERAN(nn.Module):
    """encode_images / encode_captions give the token sets; `scores` the alignment matrix."""

    def __init__(self, config: dict, feature_dim: int, text_encoder: nn.Module):
        super().__init__()
        m, im, al = config["model"], config["image"], config["alignment"]
        hidden = im["hidden_dim"] or feature_dim
        embed = m["embed_dim"]
        self.config = config
        self.image_encoder = ImageEncoder(feature_dim, hidden, im["layers"], im["heads"], im["ffn"],
                                          im["dropout"])
        self.text_encoder = use_cpu_dropout(text_encoder)
        word_dim = text_encoder.config.hidden_size
        self.image_proj = nn.Linear(hidden, embed)
        self.text_proj = nn.Linear(word_dim, embed)
        self.text_transformer = _transformer(embed, m["joint_heads"], m["joint_ffn"], m["dropout"],
                                             m["joint_layers"])
        self.image_transformer = None if m["shared_transformer"] else _transformer(
            embed, m["joint_heads"], m["joint_ffn"], m["dropout"], m["joint_layers"])
        self.mode = al["mode"]
        self.drop_tokens = al["drop_tokens"]
        self.word_max_floor_zero = al["word_max_floor_zero"]

    def encode_images(self, features, boxes, sizes, lengths):
        """features (B,R,D) with slot 0 zero, boxes (B,R,4) pixels, sizes (B,2), lengths (B,)
        -> (B, R, E) unit vectors."""
        if self.image_encoder is None:
            raise RuntimeError("encode_images after release_image_side(): load the model again")
        r = features.shape[1]
        padding = torch.arange(r, device=features.device)[None, :] >= lengths[:, None]
        x = self.image_encoder(features, box_vector(boxes, sizes), padding)
        x = self.image_proj(x)
        joint = self.text_transformer if self.image_transformer is None else self.image_transformer
        x = joint(x, src_key_padding_mask=padding)
        return F.normalize(x.float(), p=2, dim=-1)  # fp32 under bf16 autocast too

    def release_image_side(self) -> None:
        """Frees what only encode_images uses (eval and index encode every image first, then
        captions for minutes; at teran_coco's size the image side is ~110M parameters, ~440 MB
        in fp32). encode_images refuses afterwards; captions and scores are unchanged."""
        self.image_encoder = self.image_proj = None
        if self.image_transformer is not None:
            self.image_transformer = None

    def encode_captions(self, input_ids, lengths):
        """input_ids (B,W) padded with 0, lengths (B,) incl. [CLS]/[SEP] -> (B, W, E) unit vectors."""
        w = input_ids.shape[1]
        valid = torch.arange(w, device=input_ids.device)[None, :] < lengths[:, None]
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=valid.long()).last_hidden_state
        x = self.text_proj(hidden)
        x = self.text_transformer(x, src_key_padding_mask=~valid)
        return F.normalize(x.float(), p=2, dim=-1)  # fp32 under bf16 autocast too

    def masks(self, region_lengths, n_regions, word_lengths, n_words):
        return (region_keep_mask(region_lengths, n_regions),
                word_keep_mask(word_lengths, n_words, self.drop_tokens))

    def scores(self, regions, region_lengths, words, word_lengths):
        rmask, wmask = self.masks(region_lengths, regions.shape[1], word_lengths, words.shape[1])
        return alignment_scores(regions, rmask, words, wmask, self.mode, self.word_max_floor_zero)

    def forward(self, batch: dict) -> torch.Tensor:
        """The (B, B) score matrix of a training batch (image i and caption i are a pair)."""
        regions = self.encode_images(batch["features"], batch["boxes"], batch["sizes"],
                                     batch["region_lengths"])
        words = self.encode_captions(batch["input_ids"], batch["word_lengths"])
        return self.scores(regions, batch["region_lengths"], words, batch["word_lengths"])


def build_model(config: dict, feature_dim: int) -> TERAN:
    from .text_encoder import load_text_encoder
    t = config["text"]
    text = load_text_encoder(t["encoder"], t["layers"], random_init=t["random_init"])
    return TERAN(config, feature_dim, text)
