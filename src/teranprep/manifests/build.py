"""Writing a whole features/ directory from in-memory regions (importers, tests, demos).

The same layout and completion rules as extract-regions: shards written atomically, a per-shard
stats file as the completion marker, index then manifest last.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from .atomic import atomic_write_json, sha256_file
from .features import SHARDS_DIR, write_index_and_manifest
from .shards import OPTIONAL_COLUMNS, Regions, ShardWriter, shard_name


def empty_row(key: str, **extra) -> dict:
    row = {"image_key": key, "status": "error", "error": "", "shard": "", "row": -1, "width": -1,
           "height": -1, "num_boxes": 0, "file_size": -1, "file_mtime_ns": -1, "file_sha256": ""}
    row.update(extra)
    return row


def write_shard(path: Path, items: Iterable, *, feature_dim: int, dtype: str, attrs: dict,
                columns=OPTIONAL_COLUMNS, params_fingerprint: str = "",
                extra_stats: dict | None = None, marker: bool = True) -> dict:
    """Writes one shard from `items` (Regions, or (key, error message) pairs), in key order.

    Returns the shard's stats (with `marker`, also written next to it as the completion marker;
    the sharded stages leave that to pipeline/common/sharded.run_shard); `extra_stats` joins
    them, so a caller's resume check (e.g. the planned source items) is in the same marker.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(path, feature_dim=feature_dim, dtype=dtype, optional_columns=columns,
                         attrs={"params_fingerprint": params_fingerprint, **attrs})
    rows = []
    try:
        for item in items:
            if isinstance(item, Regions):
                problem = ShardWriter.check_representable(item.features, dtype)
                if problem:
                    rows.append(empty_row(item.image_key, error=f"{item.image_key}: {problem}"))
                    continue
                row = writer.append(item)
                rows.append(empty_row(item.image_key, status="ok", shard=f"{SHARDS_DIR}/{path.name}",
                                      row=row, width=item.width, height=item.height,
                                      num_boxes=len(item)))
            else:
                key, message = item
                rows.append(empty_row(key, error=message))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    stats = {"shard": f"{SHARDS_DIR}/{path.name}", "n_images": writer.n_images,
             "n_boxes": writer.n_boxes, "bytes": path.stat().st_size, "sha256": sha256_file(path),
             "params_fingerprint": params_fingerprint, "rows": rows, **(extra_stats or {})}
    if marker:
        atomic_write_json(path.with_suffix(".json"), stats)
    return stats


def write_features(out: Path, items: Iterable, *, feature_dim: int, dtype: str = "float32",
                   shard_size: int = 1000, detector: dict | None = None, stage: str = "import",
                   parameters: dict | None = None, columns=OPTIONAL_COLUMNS) -> dict:
    """A complete features/ directory from `items` sorted by key; returns its manifest."""
    from .fingerprint import fingerprint
    out = Path(out)
    t0 = time.perf_counter()
    parameters = dict(parameters or {}, dtype=dtype, shard_size=shard_size)
    params_fp = fingerprint(parameters)
    detector = detector or {"name": "unknown", "weights_sha256": "", "columns": list(columns)}
    buffer, stats = [], []

    def flush():
        stats.append(write_shard(out / SHARDS_DIR / shard_name(len(stats)), buffer,
                                 feature_dim=feature_dim, dtype=dtype, columns=columns,
                                 attrs={"detector": detector["name"],
                                        "weights_sha256": detector.get("weights_sha256", "")},
                                 params_fingerprint=params_fp))
        buffer.clear()

    for item in items:
        buffer.append(item)
        if len(buffer) == shard_size:
            flush()
    if buffer or not stats:
        flush()
    return write_index_and_manifest(
        out, stage=stage, rows=[r for s in stats for r in s["rows"]], shard_stats=stats,
        parameters=parameters, parameters_fingerprint=params_fp, detector=detector,
        feature_dim=feature_dim, dtype=dtype, input_info={},
        timings={"wall_s": round(time.perf_counter() - t0, 3)})
