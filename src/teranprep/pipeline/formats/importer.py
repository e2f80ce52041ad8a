"""import-features: a community feature format -> features/, resumable like extract-regions.

The source is listed first (ids and byte offsets / files / array rows, no features), ids are
mapped to image keys and sorted. A thin definition on pipeline/common/sharded.py: an item is a
key and its source record (id, locator, error), a shard task reads its items and writes them
through manifests.build.write_shard; the engine keeps the plan (new keys -> new shards), the
markers (with the planned items) and the dry run; index and manifest are written last.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ItemError, PrepError
from ...manifests import fingerprint
from ...manifests.atomic import sha256_file
from ...manifests.build import write_shard
from ...manifests.features import INDEX_NAME, MANIFEST_NAME, prepare_output, write_index_and_manifest
from ...manifests.outcome import mark_outcome
from ...manifests.values import region_value_problem
from ..common.distribute import report_progress
from ..common.results import FeaturesResult
from ..common.sharded import PlannedItem, ShardedStage, ShardTask
from .sources import IMPORT_FORMATS, SourceItem, open_source
from ...manifests.ownership import releases_locks
from ...manifests.remote import with_remote_folders

MAX_LISTED_DUPLICATES = 1000


@dataclass
class ImportResult(FeaturesResult):
    fmt: str = ""

    def summary(self) -> str:
        again = ("nothing to do: every shard was already complete" if self.shards_run == 0
                 else f"wrote {self.shards_run} of {self.n_shards} shards")
        notes = self.manifest.get("import", {})
        dup = notes.get("duplicates", {}).get("count", 0)
        where = f" (status=error rows in {self.out / INDEX_NAME})" if self.n_error else ""
        lines = [f"import-features {self.fmt}: {self.n_images} images -> {self.out}: {self.n_ok} ok, "
                 f"{self.n_error} errors{where}; {again} in {self.wall_s:.1f} s."]
        if dup:
            lines.append(f"  {dup} repeated ids/keys skipped (first occurrence kept; listed in manifest.json)")
        for warning in notes.get("warnings", []):
            lines.append(f"  warning: {warning}")
        lines.append(f"  Check with `prep verify {self.out}`.")
        return "\n".join(lines)


def read_key_map(path: Path) -> dict[str, str]:
    """--key-map: CSV with header id,image_key; each id and each key at most once."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"id", "image_key"} <= set(reader.fieldnames or ()):
                raise PrepError(f"{path}: a key map needs the header id,image_key "
                                f"(found {reader.fieldnames})")
            mapping, seen = {}, {}
            for line, row in enumerate(reader, 2):
                sid, key = row["id"].strip(), row["image_key"].strip()
                if sid in mapping:
                    raise PrepError(f"{path}: line {line}: id {sid!r} is mapped twice; keep one line per id")
                if key in seen:
                    raise PrepError(f"{path}: line {line}: image_key {key!r} is also the key of id "
                                    f"{seen[key]!r}; every image needs its own key")
                mapping[sid], seen[key] = key, sid
            return mapping
    except (OSError, UnicodeDecodeError) as exc:
        raise PrepError(f"{path}: unreadable key map ({exc})") from exc


def _plan(items: list[SourceItem], key_map: dict | None, key_map_path) -> tuple[list, list]:
    """(sorted [(key, item)], duplicates): one entry per key, the first occurrence in source order."""
    by_key: dict[str, SourceItem] = {}
    duplicates = []
    for item in items:
        key, error = item.source_id, item.error
        if key_map is not None and not error:
            if item.source_id in key_map:
                key = key_map[item.source_id]
            else:
                error = f"{item.source_id}: id not in --key-map {key_map_path}"
        if "\n" in key or "\t" in key:
            key, error = key.replace("\n", " ").replace("\t", " "), f"{item.source_id!r}: id holds a tab or newline"
        if key in by_key:
            duplicates.append({"key": key, "source_id": item.source_id, "locator": list(item.locator)})
            continue
        by_key[key] = SourceItem(item.source_id, item.locator, error)
    return sorted(by_key.items()), duplicates


def _item_record(key: str, item: SourceItem) -> list:
    return [key, item.source_id, list(item.locator), item.error]


@dataclass(frozen=True)
class ImportTask(ShardTask):
    """One shard of an import; runs in this process (the open source is not sent anywhere)."""
    part: tuple = ()  # ((key, SourceItem), ...) in key order
    records: tuple = ()
    dtype: str = "float32"
    columns: tuple = ()
    detector_name: str = ""
    source: object = field(default=None, compare=False, repr=False)

    def __repr__(self):
        return f"shard {self.index:05d} ({len(self.part)} images)"

    def compute(self) -> dict:
        return write_shard(self.h5_path, _regions(self.source, self.part, self.index),
                           feature_dim=self.source.feature_dim, dtype=self.dtype, columns=self.columns,
                           attrs={"detector": self.detector_name, "weights_sha256": ""},
                           params_fingerprint=self.params_fingerprint,
                           extra_stats={"items": [list(r) for r in self.records]}, marker=False)


@with_remote_folders(outputs={"out": None})
@releases_locks
def import_features(fmt: str, src: Path, out: Path, *, key_map: Path | None = None,
                    shard_size: int = 1000, dtype: str = "float32", sizes: Path | None = None,
                    splits: tuple[str, ...] = (), max_error_rate: float = 1.0,
                    overwrite: bool = False, quiet: bool = False, dry_run: bool = False,
                    echo=print) -> ImportResult:
    """Reads features in `fmt` from `src` and writes a features/ directory to `out`.

    Per-image problems (wrong field count, bad base64, num_boxes mismatch, refused pickle) become
    status=error rows (the stage fails only past `max_error_rate`, off by default); complete
    shards are kept across runs; the same parameters again are a no-op; other parameters are
    refused unless `overwrite`.
    """
    t_start = time.perf_counter()
    src, out = Path(src), Path(out)
    if fmt not in IMPORT_FORMATS:
        raise PrepError(f"unknown feature format {fmt!r}; choose one of: {', '.join(IMPORT_FORMATS)}")
    if shard_size < 1:
        raise PrepError("--shard-size must be >= 1")
    if dtype not in ("float16", "float32"):
        raise PrepError("--dtype must be float16 or float32")
    if not 0 <= max_error_rate <= 1:
        raise PrepError("--max-error-rate must be within [0, 1]")
    if sizes is not None and fmt != "teran":
        raise PrepError(f"--sizes applies to the teran format only ({fmt} records the image sizes "
                        "itself); leave --sizes out")
    if splits and fmt != "scan-precomp":
        raise PrepError(f"--split applies to scan-precomp only ({fmt} has no splits); leave --split out")
    from ...manifests.ownership import FEATURES, claim_output_dir
    claim_output_dir(out, FEATURES, create=not dry_run)
    mapping = read_key_map(key_map) if key_map else None
    source = open_source(fmt, src, sizes=sizes, splits=splits)
    try:
        result = _run(fmt, src, out, source, mapping, key_map, shard_size, dtype, sizes, splits,
                      overwrite, quiet, dry_run, echo, t_start)
    finally:
        source.close()
    failure = None
    if not dry_run and result.n_images and result.n_error / result.n_images > max_error_rate:
        failure = (f"{result.n_error} of {result.n_images} images failed "
                   f"({100 * result.n_error / result.n_images:.1f}% > --max-error-rate "
                   f"{100 * max_error_rate:g}%)")
    if not dry_run:
        mark_outcome(out / MANIFEST_NAME, failure)  # downstream stages refuse a failed folder
    if failure:
        raise PrepError(f"{out / INDEX_NAME}: {failure}; the reasons are in the error column "
                        "(status=error); the features written are kept")
    return result


def _run(fmt, src, out, source, mapping, key_map, shard_size, dtype, sizes, splits, overwrite,
         quiet, dry_run, echo, t_start):
    items = source.items()
    if not items:
        raise PrepError(f"{src}: holds no images")
    plan, duplicates = _plan(items, mapping, key_map)
    columns = tuple(source.columns)
    params = {"format": fmt, "dtype": dtype, "shard_size": shard_size,
              "feature_dim": source.feature_dim, "columns": list(columns),
              "key_map_sha256": sha256_file(Path(key_map)) if key_map else None,
              "sizes_sha256": sha256_file(Path(sizes)) if sizes else None,
              "splits": list(splits)}
    params_fp = fingerprint(params)
    prepare_output(out, params_fp, overwrite and not dry_run)
    records = [_item_record(key, item) for key, item in plan]
    listing = hashlib.sha256(json.dumps(records, separators=(",", ":")).encode()).hexdigest()
    # an item's signature is its whole source record: a moved or changed item re-runs its shard
    planned = [PlannedItem(key, record[1:], (key, item)) for (key, item), record in zip(plan, records)]
    detector = {"name": f"imported:{fmt}", "weights_sha256": "", "columns": list(columns)}

    def make_task(index, members):
        return ImportTask(index=index, out=str(out.resolve()), params_fingerprint=params_fp,
                          part=tuple(m.payload for m in members),
                          records=tuple(tuple([m.key, *m.signature]) for m in members), dtype=dtype,
                          columns=columns, detector_name=detector["name"], source=source)

    stage = ShardedStage("import-features", out, planned, shard_size, params_fp, make_task,
                         lambda stats: [[r[0], r[1:]] for r in stats.get("items", [])], listing=listing)
    if dry_run:
        for line in stage.report_lines():
            echo(line)
        return ImportResult(out, len(planned), 0, 0, len(stage.tasks), 0, time.perf_counter() - t_start,
                            fmt=fmt)
    existing = stage.current_manifest()
    if existing is not None:
        return _result(out, fmt, existing, 0, time.perf_counter() - t_start)

    from ..common.progress import ExtractProgress
    pending = stage.pending
    bar = ExtractProgress(sum(len(t.part) for t in pending), quiet=quiet, label="import-features")
    t_run = time.perf_counter()
    try:
        # in this process, one shard at a time: the source's open files stay here; a failure
        # is not retried (reading the same bytes again gives the same answer)
        stage.run(workers=0, retries=0, on_progress=bar.shard_progress)
    finally:
        bar.close()
    run_s = time.perf_counter() - t_run
    stats = stage.ordered_stats()
    warnings = []
    rows = [r for s in stats for r in s["rows"]]
    if any(r["status"] == "ok" and r["width"] < 0 for r in rows):
        warnings.append("some images have no recorded size (width = height = -1): training "
                        "normalises boxes by the image size; pass --sizes (teran) or add "
                        "{split}_sizes.npy (scan-precomp)")
    if any(v == "absent: zeros" for v in source.notes.get("boxes", {}).values()):
        warnings.append("no {split}_boxes.npy: boxes are recorded as zeros")
    manifest = write_index_and_manifest(
        out, stage="import-features", rows=rows, shard_stats=stats, parameters=params,
        parameters_fingerprint=params_fp, detector=detector, feature_dim=source.feature_dim,
        dtype=dtype, input_info={"root": str(src.resolve()), "format": fmt, "listing_sha256": listing,
                                 "source": source.signature()},
        timings={"last_run_wall_s": round(run_s, 3), "images_last_run": sum(len(t.part) for t in pending)},
        extra={"import": {"format": fmt, "notes": source.notes, "warnings": warnings,
                          "duplicates": {"count": len(duplicates),
                                         "first": duplicates[:MAX_LISTED_DUPLICATES]}}})
    return _result(out, fmt, manifest, len(pending), time.perf_counter() - t_start)


def _regions(source, part, shard_index):
    """Regions (or (key, error) pairs) of one shard in key order, updating the progress bar.
    NaN/inf, inverted or out-of-image boxes become an error row naming the source id, never a
    shard row."""
    errors = 0
    for n, (key, item) in enumerate(part, 1):
        problem = item.error
        if not problem:
            try:
                regions = source.read(item, key)
            except ItemError as exc:
                problem = str(exc)
            else:
                found = region_value_problem(regions, source=f"source id {item.source_id!r}")
                problem = f"{key}: {found}" if found else None
        if problem:
            errors += 1
            yield key, problem
        else:
            yield regions
        report_progress({"shard": shard_index, "done": n, "errors": errors})


def _result(out, fmt, manifest, shards_run, wall_s):
    return ImportResult.from_manifest(out, manifest, shards_run, wall_s, fmt=fmt)
