"""TERAN checkpoints: their format name and file names, and the loader every consumer uses
(eval, index, search, shortlist, show-alignment): a teranprep run or an original TERAN file."""

from __future__ import annotations

from pathlib import Path

from ..errors import PrepError

CHECKPOINT_FORMAT = "teranprep.teran-checkpoint"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"


def checkpoint_path(source: Path) -> Path:
    """A run directory's best checkpoint (else its last), or the file itself."""
    source = Path(source)
    if source.is_dir():
        for name in (BEST, LAST):
            if (source / name).is_file():
                return source / name
        raise PrepError(f"{source}: no {BEST} or {LAST}; train into it with `prep train` first")
    if not source.is_file():
        raise PrepError(f"{source}: no such run directory or checkpoint file")
    return source


def load_model(source: Path, device="cpu", text_encoder: Path | None = None):
    """(model in eval mode, checkpoint metadata) from a teranprep run/checkpoint or an original
    TERAN checkpoint (model_best_rsum.pth.tar). `text_encoder`: a model directory whose
    config.json supplies what an original checkpoint does not record (--text-encoder). The
    metadata has no WEIGHT_KEYS: the file is memory-mapped, its weights copied into the model."""
    from transformers import BertConfig, BertModel
    from ..safe_torch import load_torch_file
    from .model import TERAN
    from .reference_import import REFERENCE_SAFE_GLOBALS, convert_reference_checkpoint, is_reference_checkpoint

    path = checkpoint_path(source)
    raw = load_torch_file(path, extra_safe_globals=REFERENCE_SAFE_GLOBALS, mmap=True)
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        if text_encoder is not None:
            raise PrepError(f"--text-encoder applies to original TERAN checkpoints only; {path} "
                            "records its text encoder's configuration: drop the option")
        ckpt = raw
    elif is_reference_checkpoint(raw):
        ckpt = convert_reference_checkpoint(raw, path, text_encoder=text_encoder)
    else:
        raise PrepError(f"{path}: neither a teranprep checkpoint nor an original TERAN checkpoint "
                        "(dict with 'model' and 'config'); pass RUN/checkpoint_best.pt")
    text = BertModel(BertConfig.from_dict(ckpt["text_config"]), add_pooling_layer=False)
    model = TERAN(ckpt["config"], ckpt["feature_dim"], text)
    model.load_state_dict(ckpt["model"])
    # The weights now live in the model; the file's copy and a run's optimizer state (2x the
    # weights in Adam's moments) are not kept beside it: at teran_coco's size that was ~2.5 GB
    # held for the whole of an eval or a search server.
    del raw
    meta = {k: v for k, v in ckpt.items() if k not in WEIGHT_KEYS}
    del ckpt
    return model.to(device).eval(), meta


# What load_model drops from the checkpoint it returns (the model holds the weights).
WEIGHT_KEYS = ("model", "optimizer", "scheduler", "scaler")
