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


TEXT_PREFIX = "img_txt_enc.txt_enc.bert_model."
# What the state dict's shapes fix; everything else (heads first of all) must come from a config.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")
REQUIRED_CONFIG_FIELDS = ("num_attention_heads",)


def text_shapes_from_state(state: dict) -> dict:
    """The BertConfig fields the reference state dict's tensor shapes determine."""
    p = TEXT_PREFIX
    words = state[p + "embeddings.word_embeddings.weight"]
    return {"vocab_size": int(words.shape[0]), "hidden_size": int(words.shape[1]),
            "num_hidden_layers": _layer_count(state, p + "encoder.layer."),
            "intermediate_size": int(state[p + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "max_position_embeddings": int(state[p + "embeddings.position_embeddings.weight"].shape[0]),
            "type_vocab_size": int(state[p + "embeddings.token_type_embeddings.weight"].shape[0])}


def _encoder_config_json(directory: Path) -> tuple[dict, Path]:
    import json
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text("utf-8")), path
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: unreadable text encoder config ({exc}); pass --text-encoder "
                        "a Hugging Face model directory") from exc


def _named_encoder_dir(pretrain: str) -> Path | None:
    """The directory of the encoder the checkpoint names, when this machine has it."""
    from .text_encoder import resolve_encoder_dir
    try:
        return resolve_encoder_dir(pretrain)
    except PrepError:
        return None


def resolve_text_config(state: dict, text_model: dict, where: str,
                        text_encoder: Path | None = None) -> dict:
    """{"config": BertConfig dict, "source": {...}} for the reference's text encoder.

    Shapes come from the state dict; the rest from config.json of the encoder the checkpoint
    names in text-model.pretrain (as the reference built it: BertConfig.from_pretrained(pretrain,
    num_hidden_layers=extraction-hidden-layer)) and of `text_encoder` (--text-encoder). Both,
    when both are here, must agree; a config.json whose sizes contradict the shapes is refused,
    and so is a head count that nothing records.
    """
    from transformers import BertConfig

    shapes = text_shapes_from_state(state)
    recorded_layers = text_model.get("extraction-hidden-layer")
    if recorded_layers is not None and int(recorded_layers) != shapes["num_hidden_layers"]:
        raise PrepError(f"{where}: config text-model.extraction-hidden-layer={recorded_layers} but "
                        f"the state dict has {shapes['num_hidden_layers']} text encoder layers")
    word_dim = text_model.get("word-dim")
    if word_dim is not None and int(word_dim) != shapes["hidden_size"]:
        raise PrepError(f"{where}: config text-model.word-dim={word_dim} but the text encoder's "
                        f"hidden size is {shapes['hidden_size']}")
    pretrain = str(text_model.get("pretrain") or "")
    candidates = []
    named = _named_encoder_dir(pretrain) if pretrain else None
    if named is not None:
        candidates.append(named)
    if text_encoder is not None:
        if not (Path(text_encoder) / "config.json").is_file():
            raise PrepError(f"{text_encoder}: no config.json; --text-encoder takes a Hugging Face "
                            "model directory (config.json)")
        candidates.append(Path(text_encoder))
    configs = []
    for directory in candidates:
        raw, path = _encoder_config_json(directory)
        if raw.get("model_type", "bert") != "bert":
            raise PrepError(f"{path}: model_type {raw.get('model_type')!r}; the original TERAN "
                            "text encoder is a BERT")
        for name in SHAPE_FIELDS:
            if name != "num_hidden_layers" and name in raw and int(raw[name]) != shapes[name]:
                raise PrepError(f"{path}: {name}={raw[name]}, but the checkpoint's text encoder "
                                f"has {shapes[name]}: not the encoder {where} was trained from; "
                                "pass --text-encoder the right model directory")
        configs.append((path, raw))
    if not configs:
        missing = ", ".join(REQUIRED_CONFIG_FIELDS)
        raise PrepError(f"{where}: the text encoder's {missing} is not recorded in the checkpoint "
                        f"and its encoder {pretrain or '(unnamed)'!r} is not on this machine; pass "
                        "--text-encoder DIR, the model directory (config.json) of that encoder")
    path, chosen = configs[0]
    for name in REQUIRED_CONFIG_FIELDS:
        if name not in chosen:
            raise PrepError(f"{path}: no {name}; the tensor shapes cannot give it: pass "
                            "--text-encoder a model directory whose config.json records it")
    full = BertConfig.from_dict({k: v for k, v in chosen.items() if not k.startswith("_")}).to_dict()
    for other_path, other in configs[1:]:
        other_full = BertConfig.from_dict({k: v for k, v in other.items() if not k.startswith("_")}).to_dict()
        differ = [k for k in ("num_attention_heads", "hidden_act", "layer_norm_eps",
                              "position_embedding_type") if full.get(k) != other_full.get(k)]
        if differ:
            raise PrepError(f"{other_path} and {path} disagree on {', '.join(differ)}; pass "
                            "--text-encoder only when the encoder the checkpoint names is absent, "
                            "or point it at the same encoder")
    full.update(shapes)
    config = BertConfig.from_dict(full).to_dict()
    source = {"shapes": "checkpoint state dict", "pretrain": pretrain or None,
              "config_json": [str(p) for p, _ in configs]}
    return {"config": config, "source": source}


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
                 "layers": _layer_count(state, TEXT_PREFIX + "encoder.layer.")},
        "alignment": {"mode": tr["alignment-mode"], "drop_tokens": "reference",
                      "word_max_floor_zero": True},
        "training": {"batch_size": int(tr.get("bs", 40)), "lr": float(tr.get("lr", 1e-5)),
                     "grad_clip": float(tr.get("grad-clip", 2.0)), "margin": float(tr.get("margin", 0.2)),
                     "warmup_iters": int(tr.get("warmup-period", 0)) if tr.get("warmup") else 0,
                     "lr_decay": float(tr.get("gamma", 0.1)), "lr_decay_epochs": int(tr.get("step-size", 20))},
    })


def convert_reference_checkpoint(raw: dict, path: Path, text_encoder: Path | None = None) -> dict:
    """The checkpoint dict `prep eval` uses (config, model, text_config, feature_dim, ...)."""
    state = raw["model"]
    config = config_from_reference(raw["config"], state, str(path))
    mapped, dropped = map_reference_state_dict(state)
    text = resolve_text_config(state, raw["config"]["text-model"], str(path), text_encoder)
    return {"config": config, "model": mapped, "text_config": text["config"], "text_encoder": text,
            "feature_dim": config["image"]["feature_dim"], "dropped_keys": dropped,
            "step": int(raw.get("Eiters", 0) or 0), "epoch": raw.get("epoch"),
            "source": "mesnico/TERAN", "lineage": None}
