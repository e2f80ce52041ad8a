"""Test helpers for the TERAN tests: tiny random BERT dirs, splits/ dirs, planted-signal data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pandas as pd

from teranprep.manifests.atomic import canonical_json
from teranprep.manifests.features import manifest_sha256
from teranprep.manifests.splits import SPLITS_FORMAT, SPLITS_FORMAT_VERSION, relative_features_path

CLS, SEP, DOT = 2, 3, 4   # tiny vocab: 0 pad, 1 unk, 2 [CLS], 3 [SEP], 4 '.', 5.. concepts


def make_tiny_bert(directory: Path, vocab_size: int = 40, hidden: int = 16, layers: int = 2,
                   heads: int = 2, seed: int = 0, dropout: float = 0.1) -> Path:
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=32, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(directory)
    return Path(directory)


def write_splits(splits_dir: Path, features_dir: Path, splits: dict[str, list[tuple[str, list[int]]]]) -> Path:
    """splits/ with one parquet per split: rows (image_key, input_ids), plus manifest.json."""
    splits_dir = Path(splits_dir)
    splits_dir.mkdir(parents=True, exist_ok=True)
    caption_id = 0
    counts = {}
    for name, rows in splits.items():
        records = []
        for key, ids in rows:
            records.append({"image_key": key, "caption_id": caption_id, "raw": " ".join(map(str, ids)),
                            "words": [str(i) for i in ids[1:-1]],
                            "input_ids": np.asarray(ids, dtype=np.int32)})
            caption_id += 1
        pd.DataFrame(records).to_parquet(splits_dir / f"{name}.parquet", index=False)
        counts[name] = len(records)
    manifest = {"format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION,
                "features": {"path": relative_features_path(splits_dir, features_dir),
                             "manifest_sha256": manifest_sha256(features_dir)},
                "tokenizer": {"name": "tiny-test", "vocab_sha256": "0" * 64},
                "seed": 0, "counts": counts}
    (splits_dir / "manifest.json").write_bytes(canonical_json(manifest))
    return splits_dir


def tiny_config(bert_dir: Path, **training) -> dict:
    config = {
        "model": {"embed_dim": 16, "joint_layers": 1, "joint_heads": 2, "joint_ffn": 32, "dropout": 0.1},
        "image": {"hidden_dim": 16, "layers": 1, "heads": 2, "ffn": 32, "dropout": 0.1},
        "text": {"encoder": str(bert_dir), "layers": 1},
        "alignment": {"mode": "MrSw"},
        "training": {"batch_size": 4, "epochs": 2, "lr": 1e-3, "lr_decay_epochs": 1, "lr_decay": 0.5,
                     "warmup_iters": 3, "val_every": 4, "log_every": 1, "val_max_images": 50,
                     "seed": 7, "num_workers": 0},
    }
    config["training"].update(training)
    return config


def planted_config(bert):
    """The config the planted-signal learning tests train with (fp32 and bf16 alike)."""
    config = tiny_config(bert, batch_size=16, epochs=10, lr=1e-3, lr_decay_epochs=100, warmup_iters=20,
                         val_every=100, log_every=20)
    for section in ("model", "image"):
        config[section]["dropout"] = 0.0
    config["model"].update(embed_dim=32, joint_ffn=64)
    config["image"].update(hidden_dim=32, ffn=64)
    return config


def random_dataset(tmp_path: Path, make_features, n_train=12, n_val=4, caps=2, seed=0):
    """Random features (dim 8) and random captions: enough to exercise the plumbing."""
    rng = np.random.default_rng(seed)
    keys = [f"img{i:03d}.jpg" for i in range(n_train + n_val)]
    features, _ = make_features(keys, n_boxes={k: int(rng.integers(2, 6)) for k in keys}, dim=8, seed=seed)
    def rows(ks):
        return [(k, [CLS] + rng.integers(5, 40, int(rng.integers(3, 7))).tolist() + [DOT, SEP])
                for k in ks for _ in range(caps)]
    splits = write_splits(tmp_path / "splits", features, {"train": rows(keys[:n_train]),
                                                          "val": rows(keys[n_train:]),
                                                          "test": rows(keys[n_train:])})
    return splits, features


def planted_dataset(tmp_path: Path, n_concepts=24, n_train=160, n_test=30, per_image=3, dim=16, seed=0):
    """Each image has `per_image` regions, each a noisy copy of one concept's feature vector; its
    captions name those concepts (token id 5 + concept) in a random order, then '.'."""
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((n_concepts, dim)).astype(np.float32)
    regions, splits = [], {"train": [], "val": [], "test": []}
    seen, concepts_of = set(), {}
    for i in range(n_train + n_test):
        while True:
            concepts = tuple(sorted(rng.choice(n_concepts, per_image, replace=False).tolist()))
            if concepts not in seen:
                seen.add(concepts)
                break
        key = f"img{i:04d}.jpg"
        concepts_of[key] = list(concepts)  # region j shows concept concepts[j]
        feats = prototypes[list(concepts)] + 0.1 * rng.standard_normal((per_image, dim)).astype(np.float32)
        xy = rng.uniform(0, 60, (per_image, 2)).astype(np.float32)
        regions.append(Regions(key, 100, 100, np.concatenate([xy, xy + 30], 1), feats.astype(np.float32)))
        for _ in range(2):
            words = [5 + c for c in rng.permutation(list(concepts))]
            ids = [CLS] + words + [DOT, SEP]
            if i < n_train:
                splits["train"].append((key, ids))
            else:
                splits["val"].append((key, ids))
                splits["test"].append((key, ids))
    features = tmp_path / "features"
    write_features(features, regions, feature_dim=dim, dtype="float32", shard_size=64, columns=(),
                   stage="test-planted")
    return write_splits(tmp_path / "splits", features, splits), features, concepts_of


def write_tiny_tokenizer(directory: Path, vocab_size: int = 40) -> Path:
    """A WordPiece tokenizer for the tiny vocab: token id 5 + c is the word f"w{5 + c}"."""
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "."] + [f"w{i}" for i in range(5, vocab_size)]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is many times faster."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ndcg25_by_hand(raw: list[str], caption_image, t2i_order, i2t_order) -> dict:
    """NDCG@25 of given rankings over ROUGE-L relevance, one query and one pair at a time, as the
    reference's evaluation defines it: relevance of image j to caption c is rouge_l (the per-pair
    definition, checked against hand values in test_teran_relevance) of c against j's captions;
    gains 2^rel - 1, discounts log2(rank + 1), over the DCG of all candidates sorted, cut at the
    same length; t2i is the mean over captions, i2t over the images whose NDCG is not 0.
    t2i_order[c]: images ranked for caption c; i2t_order[i]: caption rows ranked for image i."""
    import math
    from teranprep.teran.relevance import rouge_l
    owner = [int(o) for o in caption_image]
    n_img = max(owner) + 1
    refs = [[raw[c] for c in range(len(raw)) if owner[c] == j] for j in range(n_img)]
    rel = [[rouge_l(raw[c], refs[j]) for j in range(n_img)] for c in range(len(raw))]

    def ndcg(ranked, every):
        ranked = ranked[:25]
        dcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ranked))
        ideal = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(sorted(every, reverse=True)[:len(ranked)]))
        return dcg / ideal if ideal else 0.0
    t2i = [ndcg([rel[c][j] for j in t2i_order[c]], rel[c]) for c in range(len(raw))]
    i2t = [ndcg([rel[c][i] for c in i2t_order[i]], [row[i] for row in rel]) for i in range(n_img)]
    counted = [v for v in i2t if v != 0]
    return {"t2i": sum(t2i) / len(t2i), "i2t": sum(counted) / len(counted)}
