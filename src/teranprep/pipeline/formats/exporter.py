"""export-features: features/ -> the files SCAN (precomp), TERAN (bu_att/bu_box) or Caffe-TSV readers load.

Images stream one at a time from FeatureStore; every output file is written under a temporary
name and renamed into place, so an interrupted export leaves no half file under a real name.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import PrepError
from ...manifests.atomic import atomic_write_bytes, atomic_write_json, commit_temp, temp_path_for
from ...manifests.features import FeatureStore, manifest_sha256, read_features_manifest
from ...manifests.lineage_warnings import emit, features_warnings, warning_fields
from .sources import SCAN_BOXES, SCAN_CAPS, SCAN_IDS, SCAN_IMS, SCAN_SIZES, SIZES_FILE
from ...manifests.ownership import releases_locks
from ...manifests.remote import lineage_location, localize_features, with_remote_folders

EXPORT_FORMATS = ("scan-precomp", "teran", "butd-tsv", "vinvl-tsv", "lmdb")
# SCAN's loaders read train / dev / test: our val split is their dev.
SCAN_SPLIT_NAMES = {"train": "train", "val": "dev", "test": "test"}
CAPTIONS_PER_IMAGE = 5
EXPORT_RECORD = "export.json"


@dataclass
class ExportResult:
    out: Path
    to: str
    files: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {v} images" for k, v in self.counts.items())
        return (f"export-features --to {self.to}: {parts} -> {self.out} ({len(self.files)} files) "
                f"in {self.wall_s:.1f} s")


class NpyStreamWriter:
    """A .npy file of known shape filled row by row: np.lib.format.open_memmap writes the header
    and sizes the file, rows then go in with os.pwrite so no mapped page stays resident."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.path = Path(path)
        self.tmp = temp_path_for(self.path)
        array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=shape)
        self.offset = int(array.offset)
        del array
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(self.tmp, os.O_RDWR)

    def write(self, i: int, row: np.ndarray) -> None:
        data = np.ascontiguousarray(row, dtype=self.dtype).reshape(self.row_shape).tobytes()
        os.pwrite(self.fd, data, self.offset + i * self.row_bytes)

    def close(self) -> None:
        os.close(self.fd)
        commit_temp(self.tmp, self.path)

    def abort(self) -> None:
        os.close(self.fd)
        self.tmp.unlink(missing_ok=True)


def _ids_for(keys, key_map: dict | None) -> list[str]:
    ids = [key_map.get(k, k) if key_map else k for k in keys]
    bad = [i for i in ids if "\n" in i or "\t" in i or not i]
    if bad:
        raise PrepError(f"image ids {bad[:3]} hold a tab or newline (or are empty) and cannot be "
                        "written to a line-based format; map them with --key-map")
    return ids


def _inverse_key_map(path: Path | None) -> dict | None:
    if path is None:
        return None
    from .importer import read_key_map
    return {key: sid for sid, key in read_key_map(path).items()}


def _split_plan(store: FeatureStore, splits: Path | None, features: Path):
    """[(scan split name, keys in order, captions per key or None)]."""
    if splits is None:
        return [("all", store.keys(), None)]
    from ...manifests.splits import SPLIT_NAMES, check_lineage, read_split
    check_lineage(splits, features)
    plan = []
    for name in SPLIT_NAMES:
        frame = read_split(splits, name, columns=("image_key", "caption_id", "raw"))
        frame = frame.sort_values(["image_key", "caption_id"], kind="stable")
        captions = {key: list(group["raw"]) for key, group in frame.groupby("image_key", sort=True)}
        short = [f"{k} ({len(c)})" for k, c in captions.items() if len(c) < CAPTIONS_PER_IMAGE]
        if short:
            raise PrepError(f"{splits / (name + '.parquet')}: SCAN precomp needs {CAPTIONS_PER_IMAGE} "
                            f"captions per image; {len(short)} images have fewer, e.g. "
                            f"{', '.join(short[:5])}")
        missing = [k for k in captions if k not in store]
        if missing:
            raise PrepError(f"{splits / (name + '.parquet')}: {len(missing)} images have no ok "
                            f"features in {features}, e.g. {missing[:5]}")
        plan.append((SCAN_SPLIT_NAMES[name], sorted(captions), captions))
    return plan


def _progress(total, quiet):
    from tqdm import tqdm
    import sys
    return tqdm(total=total, unit="img", disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)


@with_remote_folders(inputs=("splits",), outputs={"out": None})
@releases_locks
def export_features(features: Path, to: str, out: Path, *, splits: Path | None = None,
                    key_map: Path | None = None, label_map: Path | None = None,
                    quiet: bool = False) -> ExportResult:
    """Writes the images of `features` in format `to` under `out` (see docs/FORMATS.md)."""
    t0 = time.perf_counter()
    features, out = localize_features(features), Path(out)  # features at a URL: their local mirror
    if to not in EXPORT_FORMATS:
        raise PrepError(f"unknown export format {to!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    if splits is not None and to != "scan-precomp":
        raise PrepError("--splits applies to --to scan-precomp only (the other formats have no "
                        "caption files); leave it out")
    if label_map is not None and to != "vinvl-tsv":
        raise PrepError("--label-map applies to --to vinvl-tsv only; leave it out")
    inverse = _inverse_key_map(key_map)
    warnings = features_warnings(features, read_features_manifest(features))
    emit("export-features", warnings)
    from ...manifests.ownership import EXPORT, claim_output_dir
    claim_output_dir(out, EXPORT)
    with FeatureStore(features) as store:
        if to in ("vinvl-tsv", "lmdb"):
            files, counts = _export_vinvl(store, to, out, inverse, label_map, quiet)
        else:
            writer = {"scan-precomp": _export_scan, "teran": _export_teran, "butd-tsv": _export_tsv}[to]
            files, counts = writer(store, features, out, splits, inverse, quiet)
    result = ExportResult(out, to, files, counts, time.perf_counter() - t0)
    atomic_write_json(out / EXPORT_RECORD, {
        "format": to, "features": lineage_location(features),
        "features_manifest_sha256": manifest_sha256(features),
        "splits": lineage_location(splits) if splits else None, "counts": counts, "files": files,
        **warning_fields(warnings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return result


def _export_scan(store, features, out, splits, inverse, quiet):
    plan = _split_plan(store, splits, features)
    index = store.index[store.index["status"] == "ok"].set_index("image_key")
    wanted = sorted({k for _, keys, _ in plan for k in keys})
    counts_per_image = index.loc[wanted, "num_boxes"] if wanted else index["num_boxes"]
    k_values = counts_per_image.value_counts()
    if len(k_values) > 1:
        k = int(k_values.idxmax())
        odd = counts_per_image[counts_per_image != k]
        examples = ", ".join(f"{key} ({n} boxes)" for key, n in odd.head(10).items())
        raise PrepError(f"{features}: SCAN precomp needs the same number of boxes for every image; "
                        f"most have {k}, {len(odd)} do not: {examples}; re-extract with "
                        f"--min-boxes {k} --max-boxes {k}")
    k = int(k_values.index[0]) if len(k_values) else 0
    files, counts = [], {}
    bar = _progress(sum(len(keys) for _, keys, _ in plan), quiet)
    try:
        for name, keys, captions in plan:
            ids = _ids_for(keys, inverse)
            n = len(keys)
            writers = [NpyStreamWriter(out / SCAN_IMS.format(split=name), np.float32, (n, k, store.feature_dim)),
                       NpyStreamWriter(out / SCAN_BOXES.format(split=name), np.float32, (n, k, 4)),
                       NpyStreamWriter(out / SCAN_SIZES.format(split=name), np.int32, (n, 2))]
            try:
                for i, key in enumerate(keys):
                    regions = store[key]
                    writers[0].write(i, regions.features)
                    writers[1].write(i, regions.boxes)
                    writers[2].write(i, np.array([regions.width, regions.height]))
                    bar.update(1)
            except BaseException:
                for w in writers:
                    w.abort()
                raise
            for w in writers:
                w.close()
                files.append(w.path.name)
            atomic_write_bytes(out / SCAN_IDS.format(split=name), "".join(f"{i}\n" for i in ids).encode())
            files.append(SCAN_IDS.format(split=name))
            if captions is not None:
                lines = [" ".join(c.split()) for key in keys for c in captions[key][:CAPTIONS_PER_IMAGE]]
                atomic_write_bytes(out / SCAN_CAPS.format(split=name),
                                   "".join(f"{line}\n" for line in lines).encode("utf-8"))
                files.append(SCAN_CAPS.format(split=name))
            counts[name] = n
    finally:
        bar.close()
    return files, counts


def _atomic_np(path: Path, save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as fh:
            save(fh)
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _export_teran(store, features, out, splits, inverse, quiet):
    keys = store.keys()
    ids = _ids_for(keys, inverse)
    bad = [i for i in ids if i.startswith("/") or ".." in i.split("/")]
    if bad:
        raise PrepError(f"ids {bad[:3]} would be written outside {out}; map them with --key-map")
    sizes = io.StringIO()
    table = csv.writer(sizes, lineterminator="\n")
    table.writerow(["id", "width", "height"])
    bar = _progress(len(keys), quiet)
    try:
        for key, sid in zip(keys, ids):
            regions = store[key]
            feats = np.asarray(regions.features, np.float32)
            _atomic_np(out / "bu_att" / f"{sid}.npz", lambda fh: np.savez_compressed(fh, feat=feats))
            boxes = np.asarray(regions.boxes, np.float32)
            _atomic_np(out / "bu_box" / f"{sid}.npy", lambda fh: np.save(fh, boxes))
            table.writerow([sid, regions.width, regions.height])
            bar.update(1)
    finally:
        bar.close()
    atomic_write_bytes(out / SIZES_FILE, sizes.getvalue().encode("utf-8"))
    return ["bu_att/", "bu_box/", SIZES_FILE], {"all": len(keys)}


TSV_NAME = "features.tsv"


def _export_tsv(store, features, out, splits, inverse, quiet):
    keys = store.keys()
    ids = _ids_for(keys, inverse)
    path = out / TSV_NAME
    tmp = temp_path_for(path)
    bar = _progress(len(keys), quiet)
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            rows = csv.writer(fh, delimiter="\t", lineterminator="\n")
            for key, sid in zip(keys, ids):
                r = store[key]
                rows.writerow([sid, r.width, r.height, len(r),
                               base64.b64encode(np.asarray(r.boxes, "<f4").tobytes()).decode(),
                               base64.b64encode(np.asarray(r.features, "<f4").tobytes()).decode()])
                bar.update(1)
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return [TSV_NAME], {"all": len(keys)}


def _export_vinvl(store, to, out, inverse, label_map, quiet):
    from .vinvl_tsv import export_lmdb, export_vinvl_tsv
    keys = store.keys()
    ids = _ids_for(keys, inverse)
    bar = _progress(len(keys), quiet)
    try:
        files = (export_vinvl_tsv(store, keys, ids, out, bar, label_map) if to == "vinvl-tsv"
                 else export_lmdb(store, keys, ids, out, bar))
    finally:
        bar.close()
    return files, {"all": len(keys)}
