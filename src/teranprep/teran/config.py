"""TERAN configs: defaults, YAML loading (safe_load only), name resolution and validation."""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import PrepError
from ..settings import BUNDLED_CONFIGS, merge_settings, resolve_config
from .precision import PRECISIONS

PACKAGE_CONFIGS = BUNDLED_CONFIGS
ALIGNMENT_MODES = ("MrSw", "MwSr", "symm")
TOKEN_DROP_RULES = ("reference", "special", "none")

# Every key a config may set. A YAML file overrides these; unknown keys are refused so a typo
# cannot silently fall back to a default.
DEFAULTS: dict = {
    "model": {
        "embed_dim": 1024,          # joint space
        "joint_layers": 2,          # transformer layers after each projection
        "joint_heads": 4,
        "joint_ffn": 2048,
        "dropout": 0.1,
        "shared_transformer": False,
    },
    "image": {
        "feature_dim": None,        # None: taken from the features manifest
        "hidden_dim": None,         # None: = feature_dim (the reference's choice)
        "layers": 4,
        "heads": 4,
        "ffn": 2048,
        "dropout": 0.1,
    },
    "text": {
        "encoder": "bert-base-uncased",  # a local dir, a hub name, or "minilm" (offline package)
        "layers": 6,                # keep the first L layers of the encoder
        "random_init": False,       # tests: build from the dir's config.json without its weights
    },
    "alignment": {
        "mode": "MrSw",
        # reference: drop [CLS], the last word piece and [SEP] (s_seq[:, 1:-2] in its loss)
        "drop_tokens": "reference",
        # The reference evaluation pads captions to 88 tokens, so a region's best-word score is
        # floored at 0 (MwSr/symm); true reproduces that, independent of batching.
        "word_max_floor_zero": True,
    },
    "training": {
        "batch_size": 40,
        "epochs": 30,
        "lr": 1.0e-5,
        "lr_decay": 0.1,
        "lr_decay_epochs": 20,      # step schedule: x lr_decay every lr_decay_epochs epochs
        "warmup_iters": 0,          # linear warm-up from 0
        "grad_clip": 2.0,
        "margin": 0.2,
        "val_every": 500,           # steps; validation also runs at the end of training
        "log_every": 10,            # steps between training-loss records in metrics.jsonl
        "checkpoint_every": 100,    # steps between resumable checkpoints (also on SIGINT/SIGTERM); 0 = off
        "val_max_images": 1000,
        "amp": True,                # float16 autocast + grad scaling, only on CUDA, only with precision fp32
        "precision": "fp32",        # fp32 | bf16 (autocast on CPU and CUDA; losses and norms in fp32)
        "num_workers": 0,           # DataLoader worker processes (docs/ARCHITECTURE.md: loader defaults)
        "prefetch_factor": 2,       # batches each worker keeps ready (only with num_workers > 0)
        "pin_memory": "auto",       # auto: pinned host memory when training on CUDA
        "seed": 0,
        "max_regions": None,        # None: all regions of an image (slot 0 is added on top)
    },
}


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or a bundled TERAN config's name (`teran_small`, `teran_coco.yaml`);
    a bundled detector config (by name or path) is refused as the wrong kind."""
    return resolve_config(name_or_path, "teran")


def load_config(name_or_path: str | Path | dict) -> dict:
    """The resolved config: DEFAULTS overridden by the YAML file (or dict), validated."""
    if isinstance(name_or_path, dict):
        raw, where = name_or_path, "config"
    else:
        path = resolve_config_path(name_or_path)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text("utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            from ..filetypes import describe_file
            raise PrepError(f"{path}: is {describe_file(path)}, not a YAML config "
                            f"({type(exc).__name__}); pass a YAML file like "
                            "configs/teran_small.yaml or a bundled name") from exc
        if not isinstance(raw, dict):
            raise PrepError(f"{path}: a config must be a mapping of sections")
    config = merge_settings(DEFAULTS, raw, where)
    validate_config(config, where)
    return config


def validate_config(config: dict, where: str = "config") -> None:
    mode = config["alignment"]["mode"]
    if mode not in ALIGNMENT_MODES:
        raise PrepError(f"{where}: alignment.mode {mode!r} is not one of {ALIGNMENT_MODES}")
    rule = config["alignment"]["drop_tokens"]
    if rule not in TOKEN_DROP_RULES:
        raise PrepError(f"{where}: alignment.drop_tokens {rule!r} is not one of {TOKEN_DROP_RULES}")
    m = config["model"]
    if m["embed_dim"] % m["joint_heads"]:
        raise PrepError(f"{where}: model.embed_dim must be divisible by model.joint_heads")
    t = config["training"]
    if t["precision"] not in PRECISIONS:
        raise PrepError(f"{where}: training.precision {t['precision']!r} is not one of {PRECISIONS}")
    if t["pin_memory"] not in ("auto", True, False):
        raise PrepError(f"{where}: training.pin_memory must be auto, true or false")
    if int(t["num_workers"]) < 0 or int(t["prefetch_factor"]) < 1:
        raise PrepError(f"{where}: training.num_workers must be >= 0 and prefetch_factor >= 1")
    if t["batch_size"] < 2:
        raise PrepError(f"{where}: training.batch_size must be >= 2 (the loss needs negatives)")


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
