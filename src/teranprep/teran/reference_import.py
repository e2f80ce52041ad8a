"""Original TERAN checkpoints (mesnico/TERAN model_best_rsum.pth.tar) -> this package's model.

The file is a dict {epoch, model, optimizer, scheduler, opt (argparse.Namespace), config (the
reference YAML as a dict), Eiters}, loaded with weights_only=True and only argparse.Namespace
allowed on top of plain containers and tensors.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import PrepError

REFERENCE_SAFE_GLOBALS = (argparse.Namespace,)

# reference prefix -> ours; the first match wins.
KEY_MAP = (
    ("img_txt_enc.txt_enc.bert_model.", "text_encoder."),
    ("img_txt_enc.img_enc.pos_encoding_image.map.", "image_encoder.box_mlp."),
    ("img_txt_enc.img_enc.transformer_encoder.", "image_encoder.transformer."),
    ("img_txt_enc.img_proj.", "image_proj."),
    ("img_txt_enc.cap_proj.", "text_proj."),
    ("img_txt_enc.transformer_encoder_1.", "text_transformer."),
    ("img_txt_enc.transformer_encoder_2.", "image_transformer."),
)
# Built but unused by the reference's forward pass (or duplicates): dropped on import.
UNUSED_PREFIXES = (
    "img_txt_enc.txt_enc.word_embeddings.",   # a second name for BERT's embedding matrix
    "img_txt_enc.txt_enc.map.",               # 768->1024, unused
    "img_txt_enc.img_enc.fc.",                # 2048->1024, unused
    "img_txt_enc.txt_enc.bert_model.pooler.",  # BERT's pooler: its output is never read
    "img_txt_enc.txt_enc.bert_model.embeddings.position_ids",
)


def is_reference_checkpoint(obj) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("model"), dict)
            and isinstance(obj.get("config"), dict) and "text-model" in obj["config"])


def _rename_bert(key: str) -> str:
    # Checkpoints from pytorch-pretrained-bert era name LayerNorm parameters gamma/beta.
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def map_reference_state_dict(state: dict) -> tuple[dict, list[str]]:
    """(our state dict, the reference keys dropped as unused). Unknown keys are an error."""
    mapped, dropped, unknown = {}, [], []
    for key, value in state.items():
        if key.startswith(UNUSED_PREFIXES):
            dropped.append(key)
            continue
        for old, new in KEY_MAP:
            if key.startswith(old):
                mapped[_rename_bert(new + key[len(old):])] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise PrepError(f"original TERAN checkpoint has keys this importer does not know "
                        f"({unknown[:3]}...): only the bottom-up + BERT TERAN models are supported")
    return mapped, dropped


def _layer_count(state: dict, prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def text_config_from_state(state: dict) -> dict:
    """A BertConfig dict from the shapes in the reference state dict (heads: hidden/64, BERT's)."""
    from transformers import BertConfig
    p = "img_txt_enc.txt_enc.bert_model."
    words = state[p + "embeddings.word_embeddings.weight"]
    hidden = int(words.shape[1])
    return BertConfig(
        vocab_size=int(words.shape[0]), hidden_size=hidden,
        num_hidden_layers=_layer_count(state, p + "encoder.layer."),
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=int(state[p + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(state[p + "embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(state[p + "embeddings.token_type_embeddings.weight"].shape[0]),
    ).to_dict()


def config_from_reference(ref: dict, state: dict, where: str) -> dict:
    """Our resolved config from the reference YAML dict; refuses variants this model lacks."""
    from .config import load_config
    tm, im, m, tr = ref["text-model"], ref["image-model"], ref["model"], ref["training"]
    problems = []
    if tm.get("name") != "bert":
        problems.append(f"text-model.name={tm.get('name')!r} (only 'bert')")
    if tm.get("layers", 0):
        problems.append("text-model.layers > 0 (an extra text transformer)")
    if im.get("name") != "bottomup" or im.get("pos-encoding") != "concat-and-process":
        problems.append("image-model must be bottomup with pos-encoding concat-and-process")
    if "alignment" not in tr.get("loss-type", ""):
        problems.append(f"training.loss-type={tr.get('loss-type')!r} (only 'alignment')")
    if m.get("exclude-stopwords"):
        problems.append("model.exclude-stopwords")
    if tr.get("alignment-mode") not in ("MrSw", "MwSr", "symm"):
        problems.append(f"training.alignment-mode={tr.get('alignment-mode')!r}")
    if problems:
        raise PrepError(f"{where}: unsupported original TERAN variant: {'; '.join(problems)}")
    shared = bool(m.get("shared-transformer", False))
    feat = int(im["feat-dim"])
    return load_config({
        "model": {"embed_dim": int(m["embed-size"]), "joint_layers": int(m["layers"]),
                  "joint_heads": 4, "joint_ffn": 2048, "dropout": float(m.get("dropout", 0.1)),
                  "shared_transformer": shared},
        "image": {"feature_dim": feat, "hidden_dim": feat, "layers": int(im["transformer-layers"]),
                  "heads": 4, "ffn": 2048, "dropout": float(im.get("dropout", 0.1))},
        "text": {"encoder": str(tm.get("pretrain", "bert-base-uncased")),
                 "layers": _layer_count(state, "img_txt_enc.txt_enc.bert_model.encoder.layer.")},
        "alignment": {"mode": tr["alignment-mode"], "drop_tokens": "reference",
                      "word_max_floor_zero": True},
        "training": {"batch_size": int(tr.get("bs", 40)), "lr": float(tr.get("lr", 1e-5)),
                     "grad_clip": float(tr.get("grad-clip", 2.0)), "margin": float(tr.get("margin", 0.2)),
                     "warmup_iters": int(tr.get("warmup-period", 0)) if tr.get("warmup") else 0,
                     "lr_decay": float(tr.get("gamma", 0.1)), "lr_decay_epochs": int(tr.get("step-size", 20))},
    })


def convert_reference_checkpoint(raw: dict, path: Path) -> dict:
    """The checkpoint dict `prep eval` uses (config, model, text_config, feature_dim, ...)."""
    state = raw["model"]
    config = config_from_reference(raw["config"], state, str(path))
    mapped, dropped = map_reference_state_dict(state)
    return {"config": config, "model": mapped, "text_config": text_config_from_state(state),
            "feature_dim": config["image"]["feature_dim"], "dropped_keys": dropped,
            "step": int(raw.get("Eiters", 0) or 0), "epoch": raw.get("epoch"),
            "source": "mesnico/TERAN", "lineage": None}
