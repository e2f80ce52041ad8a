"""Shared by the search tests: one planted-signal TERAN run (trained once per session) and indexes."""

from __future__ import annotations

import numpy as np
import pytest

from teran_fixtures import make_tiny_bert, planted_dataset, tiny_config, write_tiny_tokenizer


@pytest.fixture(scope="session")
def planted_run(tmp_path_factory):
    """(root, splits, features, run, tokenizer dir) of a TERAN trained on planted signal."""
    import torch
    from teranprep.pipeline.train import train
    root = tmp_path_factory.mktemp("planted")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits, features, concepts_of = planted_dataset(root)
        bert = make_tiny_bert(root / "bert", vocab_size=40, hidden=32, layers=1)
        config = tiny_config(bert, batch_size=16, epochs=6, lr=1e-3, lr_decay_epochs=100,
                             warmup_iters=20, val_every=1000, log_every=50)
        for section in ("model", "image"):
            config[section]["dropout"] = 0.0
        config["model"].update(embed_dim=32, joint_ffn=64)
        config["image"].update(hidden_dim=32, ffn=64)
        run = root / "run"
        train(splits, config, run, echo=lambda *_: None)
        tok = write_tiny_tokenizer(root / "tok")
    finally:
        torch.set_num_threads(before)
    return {"root": root, "splits": splits, "features": features, "run": run, "tokenizer": tok,
            "concepts_of": concepts_of}


def words_query(ids: list[int]) -> str:
    """The tiny tokenizer's text for token ids 5.. (word w5 is id 5)."""
    return " ".join(f"w{i}" for i in ids)


def split_captions(splits, split="test"):
    import pandas as pd
    frame = pd.read_parquet(splits / f"{split}.parquet")
    return [(key, list(np.asarray(ids).tolist())) for key, ids in zip(frame["image_key"], frame["input_ids"])]
