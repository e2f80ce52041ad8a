"""splits/: {train,val,test}.parquet (one row per caption) + manifest.json with lineage to features/.

Columns: image_key (str), caption_id (int64, unique across splits), raw (str), words (list[str],
spaCy tokens, lower-cased), input_ids (list[int32], WordPiece ids incl. [CLS]/[SEP]).
manifest.json: format, version, features {path (relative to splits/ when possible),
manifest_sha256}, tokenizer {name, vocab_sha256}, seed, counts per split, dropped captions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..errors import PrepError
from .features import MANIFEST_NAME as FEATURES_MANIFEST, manifest_sha256

SPLITS_FORMAT = "teranprep.splits"
SPLITS_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
SPLIT_COLUMNS = ("image_key", "caption_id", "raw", "words", "input_ids")


def split_path(splits_dir: Path, name: str) -> Path:
    return Path(splits_dir) / f"{name}.parquet"


def read_splits_manifest(splits_dir: Path) -> dict:
    path = Path(splits_dir) / "manifest.json"
    if not path.is_file():
        raise PrepError(f"{path}: no splits manifest; run `prep build-splits` into {splits_dir} first")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except ValueError as exc:
        raise PrepError(f"{path}: unreadable splits manifest ({exc}); re-run build-splits") from exc
    if manifest.get("format") != SPLITS_FORMAT:
        raise PrepError(f"{path}: not a teranprep splits manifest (format {manifest.get('format')!r})")
    return manifest


def read_split(splits_dir: Path, name: str, columns=None) -> pd.DataFrame:
    path = split_path(splits_dir, name)
    if not path.is_file():
        raise PrepError(f"{path}: split {name!r} not found; build-splits writes train, val and test")
    frame = pd.read_parquet(path, columns=list(columns) if columns else None)
    missing = set(columns or SPLIT_COLUMNS) - set(frame.columns)
    if missing:
        raise PrepError(f"{path}: missing columns {sorted(missing)}; rebuild with `prep build-splits`")
    return frame


def relative_features_path(splits_dir: Path, features_dir: Path) -> str:
    """The features path as recorded in splits/manifest.json: relative to splits/ when possible."""
    try:
        return Path(os.path.relpath(Path(features_dir).resolve(), Path(splits_dir).resolve())).as_posix()
    except ValueError:  # different drives
        return str(Path(features_dir).resolve())


def resolve_features_dir(splits_dir: Path, override: Path | None = None) -> Path:
    """Where the features of these splits are: `override` (--features) or the manifest's path."""
    if override is not None:
        return Path(override)
    manifest = read_splits_manifest(splits_dir)
    recorded = Path(manifest["features"]["path"])
    return recorded if recorded.is_absolute() else (Path(splits_dir) / recorded)


def check_lineage(splits_dir: Path, features_dir: Path | None = None) -> Path:
    """Refuses splits whose features manifest changed since build-splits; returns the features dir."""
    manifest = read_splits_manifest(splits_dir)
    features = resolve_features_dir(splits_dir, features_dir)
    expected = manifest["features"]["manifest_sha256"]
    actual = manifest_sha256(features)
    if actual != expected:
        raise PrepError(f"{Path(features) / FEATURES_MANIFEST}: sha256 {actual[:12]}.. differs from "
                        f"the {expected[:12]}.. recorded in {Path(splits_dir) / 'manifest.json'}: the "
                        "features changed since build-splits; re-run `prep build-splits` or point "
                        "--features at the features the splits were built from")
    return features
