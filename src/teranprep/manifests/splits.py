"""splits/: {train,val,test}.parquet (one row per caption) + manifest.json with lineage to features/.

Columns: image_key (str), caption_id (int64, unique across splits), raw (str), words (list[str],
spaCy tokens, lower-cased), input_ids (list[int32], WordPiece ids incl. [CLS]/[SEP]).
manifest.json: format, version, features {path (relative to splits/ when possible),
manifest_sha256}, tokenizer {name, vocab_sha256}, seed, counts per split, dropped captions.
missing.csv / dropped.csv: the captions left out (no ok features / empty, duplicate, bad UTF-8).
Writers put each file under a temporary name and rename it; manifest.json goes last and lists
every file with its sha256, so a directory whose files do not match it is not a finished build.
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
SPLITS_MANIFEST = "manifest.json"
MISSING_NAME = "missing.csv"
MISSING_COLUMNS = ("caption_id", "image_key", "raw")
DROPPED_NAME = "dropped.csv"
DROPPED_COLUMNS = ("caption_id", "image_key", "reason", "detail", "raw")


def caption_rule_of(manifest: dict | None) -> str:
    """The caption rule (tokenizers/text.py) a splits manifest's captions were normalised by;
    splits built before it was recorded applied none ("as-given")."""
    from ..tokenizers.text import UNRECORDED_CAPTION_RULE
    return ((manifest or {}).get("parameters") or {}).get("caption_rule", UNRECORDED_CAPTION_RULE)


def run_caption_rule(lineage: dict | None, splits_dir: Path | None = None) -> str:
    """The caption rule a run was trained under, for its queries: its lineage's record; for a run
    from before the record, the rule of the splits it names (if still there, unchanged); for a
    checkpoint without lineage (an original TERAN one), that of `splits_dir` when given, else the
    default (queries with a final '.', what the reference token-dropping rule expects)."""
    from .atomic import sha256_file
    from ..tokenizers.text import DEFAULT_CAPTION_RULE, UNRECORDED_CAPTION_RULE
    if lineage:
        if lineage.get("caption_rule"):
            return lineage["caption_rule"]
        path = Path(lineage.get("splits") or "") / SPLITS_MANIFEST
        if lineage.get("splits") and path.is_file() \
                and sha256_file(path) == lineage.get("splits_manifest_sha256"):
            return caption_rule_of(read_splits_manifest(path.parent))
        return UNRECORDED_CAPTION_RULE
    if splits_dir is not None and (Path(splits_dir) / SPLITS_MANIFEST).is_file():
        return caption_rule_of(read_splits_manifest(splits_dir))
    return DEFAULT_CAPTION_RULE


def split_path(splits_dir: Path, name: str) -> Path:
    return Path(splits_dir) / f"{name}.parquet"


def read_splits_manifest(splits_dir: Path) -> dict:
    from .ownership import read_stamped_json
    return read_stamped_json(
        Path(splits_dir) / "manifest.json", SPLITS_FORMAT, what="splits manifest",
        missing=f"no splits manifest; run `prep build-splits` into {splits_dir} first",
        unreadable="re-run build-splits", foreign="not a teranprep splits manifest")


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
    """The features path as recorded in splits/manifest.json: relative to splits/ when possible;
    features at a URL (or their local mirror) are recorded by their URL."""
    from .remote import mirror_url, url_of
    url = url_of(features_dir) or mirror_url(features_dir)
    if url:
        return url
    try:
        return Path(os.path.relpath(Path(features_dir).resolve(), Path(splits_dir).resolve())).as_posix()
    except ValueError:  # different drives
        return str(Path(features_dir).resolve())


def resolve_features_dir(splits_dir: Path, override: Path | None = None) -> Path:
    """Where the features of these splits are: `override` (--features) or the manifest's path."""
    from .remote import localize_features, url_of
    if override is not None:
        return localize_features(override)
    manifest = read_splits_manifest(splits_dir)
    if url_of(manifest["features"]["path"]):
        return localize_features(manifest["features"]["path"])
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


# ---- writer side (build-splits) ----

def split_schema():
    import pyarrow as pa
    return pa.schema([("image_key", pa.string()), ("caption_id", pa.int64()), ("raw", pa.string()),
                      ("words", pa.list_(pa.string())), ("input_ids", pa.list_(pa.int32()))])


def _commit_file(splits_dir: Path, name: str, write) -> dict:
    """Runs write(tmp_path), then renames tmp into place; returns {rows?, bytes, sha256} of the file."""
    from .atomic import commit_temp, sha256_file, temp_path_for
    final = Path(splits_dir) / name
    tmp = temp_path_for(final)
    try:
        write(tmp)
        commit_temp(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"bytes": final.stat().st_size, "sha256": sha256_file(final)}


def _arrow_column(values, type_):
    import pyarrow as pa
    if isinstance(values, pa.Array):  # built columnar already (the tokenizer's output)
        return values if values.type == type_ else values.cast(type_)
    return pa.array(values, type_)


def write_split(splits_dir: Path, name: str, batches) -> dict:
    """Writes {name}.parquet atomically from `batches`, each a dict of SPLIT_COLUMNS (lists or
    pyarrow arrays; one row group per batch, so memory stays bounded by a batch); returns
    {rows, bytes, sha256}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = split_schema()
    rows = 0

    def write(tmp):
        nonlocal rows
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in batches:
                table = pa.Table.from_arrays(
                    [_arrow_column(batch[field.name], field.type) for field in schema], schema=schema)
                writer.write_table(table)
                rows += table.num_rows

    stats = _commit_file(splits_dir, split_path(splits_dir, name).name, write)
    return {"rows": rows, **stats}


def write_report_csv(splits_dir: Path, name: str, columns, rows) -> dict:
    """Writes a CSV report (header `columns`, then `rows`) atomically; returns its stats."""
    import csv
    import io
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    stats = _commit_file(splits_dir, name, lambda tmp: Path(tmp).write_bytes(data))
    return {"rows": len(rows), **stats}


def write_splits_manifest(splits_dir: Path, manifest: dict) -> None:
    """manifest.json, written last: its presence is what makes splits/ complete."""
    from .atomic import atomic_write_json
    atomic_write_json(Path(splits_dir) / SPLITS_MANIFEST, manifest)


def existing_splits_manifest(splits_dir: Path) -> dict | None:
    """The manifest of a finished build in `splits_dir`, or None (absent, unreadable, foreign)."""
    try:
        manifest = json.loads((Path(splits_dir) / SPLITS_MANIFEST).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == SPLITS_FORMAT else None


def splits_files_intact(splits_dir: Path, manifest: dict) -> bool:
    """True when every file the manifest lists is there with the recorded sha256."""
    from .atomic import sha256_file
    files = manifest.get("files") or {}
    if not all(split_path(splits_dir, n).name in files for n in SPLIT_NAMES):
        return False
    for name, info in files.items():
        path = Path(splits_dir) / name
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
        if sha256_file(path) != info.get("sha256"):
            return False
    return True


def clear_splits(splits_dir: Path) -> None:
    """Removes a previous build: the manifest first, so a half-cleared directory is never complete."""
    from .shards import remove_stale_temps
    splits_dir = Path(splits_dir)
    (splits_dir / SPLITS_MANIFEST).unlink(missing_ok=True)
    for name in (*(split_path(splits_dir, n).name for n in SPLIT_NAMES), MISSING_NAME, DROPPED_NAME):
        (splits_dir / name).unlink(missing_ok=True)
    remove_stale_temps(splits_dir)


def split_leaks(rows) -> list[str]:
    """What makes splits leak, from (split, image_key, caption_id) rows: an image in two splits,
    or one caption_id used twice. Each finding is one phrase with up to 5 example keys / ids;
    build-splits refuses on any, and verify reports them (the same check for both)."""
    owner: dict[str, str] = {}
    clashes: dict[str, set] = {}
    ids_seen: dict = {}
    repeated: list = []
    for split, key, caption_id in rows:
        first = owner.setdefault(key, split)
        if first != split:
            clashes.setdefault(key, {first}).add(split)
        if caption_id in ids_seen:
            repeated.append(caption_id)
        else:
            ids_seen[caption_id] = key
    found = []
    if clashes:
        examples = ", ".join(f"{key!r} ({' and '.join(s for s in SPLIT_NAMES if s in splits)})"
                             for key, splits in sorted(clashes.items())[:5])
        found.append(f"{len(clashes)} images are in two splits: {examples}")
    if repeated:
        examples = ", ".join(map(str, sorted(set(repeated))[:5]))
        found.append(f"caption_id is not unique across splits ({len(repeated)} repeated ids): "
                     f"e.g. {examples}")
    return found
