"""verify: re-read an output directory and name every problem with the file it is in."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifests import sha256_file
from ..manifests.features import FEATURES_FORMAT, INDEX_COLUMNS, INDEX_NAME, MANIFEST_NAME, SHARDS_DIR
from ..manifests.shards import ShardReader


@dataclass
class VerifyReport:
    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, path, message):
        self.problems.append(f"{path}: {message}")


def verify(path: Path) -> VerifyReport:
    """Checks a features/ directory (more kinds of outputs register in VERIFIERS)."""
    path = Path(path)
    report = VerifyReport(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        report.problem(manifest_path, "missing: the stage never finished here (re-run it)")
        return report
    try:
        manifest = json.loads(manifest_path.read_text("utf-8"))
    except ValueError as exc:
        report.problem(manifest_path, f"not valid JSON ({exc})")
        return report
    fmt = manifest.get("format")
    checker = VERIFIERS.get(fmt)
    if checker is None:
        report.problem(manifest_path, f"unknown format {fmt!r}")
        return report
    checker(path, manifest, report)
    return report


def verify_features(root: Path, manifest: dict, report: VerifyReport) -> None:
    listed_keys: dict[str, tuple[str, int]] = {}
    for entry in manifest.get("shards", []):
        shard_path = root / entry["path"]
        if not shard_path.is_file():
            report.problem(shard_path, "listed in the manifest but missing")
            continue
        size = shard_path.stat().st_size
        if size != entry["bytes"]:
            report.problem(shard_path, f"size {size} bytes, manifest says {entry['bytes']} (truncated?)")
        digest = sha256_file(shard_path)
        if digest != entry["sha256"]:
            report.problem(shard_path, f"sha256 {digest[:12]}.. differs from the manifest's "
                                       f"{entry['sha256'][:12]}.. (damaged or replaced)")
        try:
            reader = ShardReader(shard_path)
        except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
            report.problem(shard_path, f"cannot be opened as a regions shard ({exc})")
            continue
        with reader:
            _check_shard_structure(reader, entry, report)
            for row, key in enumerate(reader.image_keys):
                if key in listed_keys:
                    report.problem(shard_path, f"image {key!r} also stored in {listed_keys[key][0]}")
                listed_keys[key] = (entry["path"], row)
        report.checked.append(entry["path"])
    _check_index(root, manifest, listed_keys, report)
    shard_dir = root / SHARDS_DIR
    if shard_dir.is_dir():
        listed = {Path(e["path"]).name for e in manifest.get("shards", [])}
        for extra in sorted(shard_dir.glob("*.h5")):
            if extra.name not in listed:
                report.warnings.append(f"{extra}: not listed in the manifest (ignored by readers)")


def _check_shard_structure(reader: ShardReader, entry: dict, report: VerifyReport) -> None:
    path = reader.path
    offsets = reader.offsets
    n = len(reader.image_keys)
    n_rows = reader.dataset("features").shape[0]
    if n != entry["n_images"]:
        report.problem(path, f"{n} images, manifest says {entry['n_images']}")
    if len(offsets) != n + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        report.problem(path, "offsets are not a non-decreasing sequence from 0 with one entry per image + 1")
    elif offsets[-1] != n_rows:
        report.problem(path, f"offsets end at {offsets[-1]} but features has {n_rows} rows")
    if n_rows != entry["n_boxes"]:
        report.problem(path, f"{n_rows} feature rows, manifest says {entry['n_boxes']} boxes")
    for name in ["boxes", *reader.columns]:
        if reader.dataset(name).shape[0] != n_rows:
            report.problem(path, f"dataset {name} has {reader.dataset(name).shape[0]} rows, "
                                 f"features has {n_rows}")
    if reader.image_size.shape != (n, 2):
        report.problem(path, f"image_size shape {reader.image_size.shape}, expected ({n}, 2)")
    if reader.image_keys != sorted(set(reader.image_keys)):
        report.problem(path, "image_keys are not sorted and unique")


def _check_index(root: Path, manifest: dict, stored: dict, report: VerifyReport) -> None:
    index_path = root / INDEX_NAME
    try:
        index = pd.read_parquet(index_path)
    except Exception as exc:  # noqa: BLE001
        report.problem(index_path, f"unreadable ({exc})")
        return
    expected = manifest.get("index", {}).get("sha256")
    if expected and sha256_file(index_path) != expected:
        report.problem(index_path, "sha256 differs from the manifest's (edited after the run?)")
    missing_cols = set(INDEX_COLUMNS) - set(index.columns)
    if missing_cols:
        report.problem(index_path, f"missing columns {sorted(missing_cols)}")
        return
    dup = index["image_key"][index["image_key"].duplicated()]
    for key in dup.head(10):
        report.problem(index_path, f"image {key!r} has more than one row")
    ok = index[index["status"] == "ok"]
    for key, shard, row in zip(ok["image_key"], ok["shard"], ok["row"]):
        where = stored.get(key)
        if where is None:
            report.problem(index_path, f"ok image {key!r} is in no listed shard")
        elif where != (shard, int(row)):
            report.problem(index_path, f"image {key!r} points at {shard} row {row}, it is stored "
                                       f"at {where[0]} row {where[1]}")
    for key in sorted(set(stored) - set(ok["image_key"]))[:10]:
        report.problem(index_path, f"image {key!r} is stored in {stored[key][0]} but not indexed as ok")
    counts = manifest.get("counts", {})
    if counts.get("ok") != len(ok):
        report.problem(index_path, f"{len(ok)} ok rows, manifest counts {counts.get('ok')}")


VERIFIERS = {FEATURES_FORMAT: verify_features}
