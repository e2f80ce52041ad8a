"""features/: manifest.json + index.parquet + shards/, and the reader that maps image_key -> Regions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ..errors import PrepError
from .shards import Regions, ShardReader

FEATURES_FORMAT = "teranprep.features"
FEATURES_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.parquet"
SHARDS_DIR = "shards"
INDEX_COLUMNS = {
    "image_key": "string", "status": "string", "error": "string", "shard": "string",
    "row": "int64", "width": "int64", "height": "int64", "num_boxes": "int64",
    "file_size": "int64", "file_mtime_ns": "int64", "file_sha256": "string",
}

# present when the input carried them (webdataset / img2dataset tars: the sample's .txt and .json)
OPTIONAL_INDEX_COLUMNS = {"caption": "string", "metadata": "string"}


def read_features_manifest(features_dir: Path) -> dict:
    from .outcome import refuse_failed
    from .ownership import read_stamped_json
    from .remote import localize_features
    features_dir = localize_features(features_dir)  # a URL: its local mirror (manifest + index)
    manifest = read_stamped_json(
        Path(features_dir) / MANIFEST_NAME, FEATURES_FORMAT, what="features manifest",
        missing="no features manifest; run `prep extract-regions` or `prep import-features` into "
                "this directory first (or finish the run)",
        unreadable="re-run the stage that wrote it", foreign="not a teranprep features manifest")
    return refuse_failed(manifest, Path(features_dir) / MANIFEST_NAME)  # a failed stage's: refused


def index_frame(rows: list[dict]) -> pd.DataFrame:
    """The index as a DataFrame with the documented column types, sorted by image key."""
    optional = {c: t for c, t in OPTIONAL_INDEX_COLUMNS.items() if any(c in r for r in rows)}
    columns = {**INDEX_COLUMNS, **optional}
    frame = pd.DataFrame(rows, columns=list(columns))
    frame = frame.astype(columns)
    return frame.sort_values("image_key", kind="stable").reset_index(drop=True)


class FeatureStore:
    """Read-only, random-access view of a features/ directory.

    `store[key]` reads one image's rows from its shard (never the whole shard); `get_many(keys)`
    reads many in file order; `read_columns` / `features` read only some datasets. Shard handles
    are opened lazily and reopened after a fork, so a store can be shared with DataLoader workers.
    """

    def __init__(self, features_dir: Path):
        from .remote import localize_features, mirror_url
        self.root = localize_features(features_dir)  # a URL: a local mirror, shards fetched on use
        self._remote = mirror_url(self.root) is not None
        self.manifest = read_features_manifest(self.root)
        index_path = self.root / INDEX_NAME
        try:
            self.index = pd.read_parquet(index_path)
        except (OSError, ValueError) as exc:
            raise PrepError(f"{index_path}: unreadable index ({exc}); re-run the stage") from exc
        ok = self.index[self.index["status"] == "ok"]
        self._where = dict(zip(ok["image_key"], zip(ok["shard"], ok["row"].astype(int))))
        self.feature_dim = int(self.manifest.get("feature_dim", 0))
        self._readers: dict[str, ShardReader] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return sorted(self._where)

    def _reader(self, shard: str) -> ShardReader:
        if os.getpid() != self._pid:  # HDF5 handles must not cross a fork
            for inherited in self._readers.values():
                inherited.close()  # the child's copies of the descriptors; HDF5 left alone
            self._readers = {}
            self._pid = os.getpid()
        reader = self._readers.get(shard)
        if reader is None:
            reader = self._readers[shard] = ShardReader(self.shard_path(shard))
        return reader

    def shard_path(self, shard: str) -> Path:
        """The local file of a shard (features at a URL: fetched whole into the cache first,
        sha256-checked, least recently used shards evicted)."""
        if self._remote:
            from .remote import ensure_shard
            return ensure_shard(self.root, shard)
        return self.root / shard

    @property
    def location(self) -> str:
        """The folder as users name it: its URL for features at a URL, else its path."""
        from .remote import location
        return location(self.root)

    def _locate(self, key: str) -> tuple[ShardReader, int]:
        try:
            shard, row = self._where[key]
        except KeyError:
            raise KeyError(f"{key!r} has no ok regions in {self.root}") from None
        reader = self._reader(shard)
        if reader.image_keys[row] != key:
            raise PrepError(f"{self.location}/{shard}: row {row} holds {reader.image_keys[row]!r}, the "
                            f"index says {key!r}; run `prep verify {self.location}`")
        return reader, row

    def __getitem__(self, key: str) -> Regions:
        reader, row = self._locate(key)
        return reader.read(row)

    def image_size(self, key: str) -> tuple[int, int]:
        """(width, height) of one image, from its shard's metadata (no read of its rows)."""
        reader, row = self._locate(key)
        return reader.image_size_of(row)

    def get(self, key: str, default=None):
        return self[key] if key in self._where else default

    def read_columns(self, key: str, names=("features", "boxes"), max_rows: int | None = None) -> list:
        """Only the named datasets' rows of one image (at most `max_rows`): the training path."""
        reader, row = self._locate(key)
        return reader.read_columns(row, names, max_rows)

    def features(self, key: str, max_rows: int | None = None):
        """One image's (n, D) features and nothing else."""
        return self.read_columns(key, ("features",), max_rows)[0]

    def get_many(self, keys, names=None, max_rows: int | None = None) -> list:
        """`[store[k] for k in keys]` (or read_columns with `names`), read shard by shard in row
        order: each image is read once however often it is asked for, and neighbouring rows in one
        read. Results follow the order of `keys`."""
        keys = list(keys)
        by_shard: dict[ShardReader, list[int]] = {}
        slots: dict[ShardReader, list[int]] = {}
        for i, key in enumerate(keys):
            reader, row = self._locate(key)
            by_shard.setdefault(reader, []).append(row)
            slots.setdefault(reader, []).append(i)
        out = [None] * len(keys)
        for reader, rows in by_shard.items():
            for i, item in zip(slots[reader], reader.read_many(rows, names, max_rows)):
                out[i] = item
        return out

    def __iter__(self):
        for key in self.keys():
            yield self[key]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state


def write_index_and_manifest(out: Path, *, stage: str, rows: list[dict], shard_stats: list[dict],
                             parameters: dict, parameters_fingerprint: str, detector: dict,
                             feature_dim: int, dtype: str, input_info: dict, timings: dict,
                             extra: dict | None = None) -> dict:
    """Writes index.parquet then manifest.json (last, atomically) for a features/ directory.

    `shard_stats` are the per-shard stats dicts (shard, n_images, n_boxes, bytes, sha256) in shard
    order; `rows` the index rows of every input item. Returns the manifest written.
    """
    import hashlib
    import platform
    import sys
    import time

    from .. import __version__
    from .atomic import atomic_write_bytes, canonical_json

    out = Path(out)
    frame, index_bytes = write_index_parquet(out, rows)
    manifest = {
        "format": FEATURES_FORMAT, "format_version": FEATURES_FORMAT_VERSION, "stage": stage,
        "teranprep_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": parameters, "parameters_fingerprint": parameters_fingerprint,
        "detector": detector, "feature_dim": int(feature_dim), "dtype": dtype,
        "input": {**input_info, "n_images": len(rows)},
        "counts": status_counts(frame),
        "index": {"path": INDEX_NAME, "sha256": hashlib.sha256(index_bytes).hexdigest()},
        "shards": shard_entries(shard_stats),
        "timings": timings,
        "environment": {"python": sys.version.split()[0], "torch": installed_version("torch"),
                        "torchvision": installed_version("torchvision"), "platform": platform.platform(),
                        "cpu_capability": cpu_capability(shard_stats, computed=stage == "extract-regions")},
        **(extra or {}),
    }
    atomic_write_bytes(out / MANIFEST_NAME, canonical_json(manifest))
    return manifest


def cpu_capability(shard_stats: list[dict], computed: bool) -> str | None:
    """The CPU kernel level torch dispatched to (DEFAULT, AVX2, AVX512, ...): CPU features are
    byte-identical only between runs with the same level and threads per task. Shards that
    recorded their worker's level win; else a stage that computed the features here asks torch
    (LocalCluster workers share this machine and environment); stages that only copy features
    (import-features) record None rather than import torch."""
    levels = sorted({s["cpu_capability"] for s in shard_stats if s.get("cpu_capability")})
    if levels:
        return levels[0] if len(levels) == 1 else ",".join(levels)
    if not computed:
        return None
    import torch
    return str(torch.backends.cpu.get_cpu_capability())


def write_index_parquet(out: Path, rows: list[dict]) -> tuple[pd.DataFrame, bytes]:
    """out/index.parquet from `rows` (documented types, key order), written atomically; returns
    the frame and the file's bytes (their sha256 goes into the manifest)."""
    from .atomic import atomic_write_bytes
    frame = index_frame(rows)
    tmp = Path(out) / f".{INDEX_NAME}.build"
    frame.to_parquet(tmp, index=False)
    index_bytes = tmp.read_bytes()
    tmp.unlink()
    atomic_write_bytes(Path(out) / INDEX_NAME, index_bytes)
    return frame, index_bytes


def status_counts(frame: pd.DataFrame) -> dict:
    return {status: int((frame["status"] == status).sum()) for status in ("ok", "error", "skipped")}


def shard_entries(shard_stats: list[dict]) -> list[dict]:
    """The manifest's shards list from per-shard stats dicts (a shard stored at a URL also
    records its object's ETag)."""
    return [{"path": s["shard"], "n_images": s["n_images"], "n_boxes": s["n_boxes"],
             "bytes": s["bytes"], "sha256": s["sha256"],
             **({"etag": s["object"]["etag"]} if s.get("object", {}).get("etag") else {})}
            for s in shard_stats]


def installed_version(package: str) -> str:
    """A package's __version__ without importing it: importing torch just to name its version
    costs a stage ~600 MB of RSS (import-features stays under 500 MB without it)."""
    import importlib.metadata
    import importlib.util
    import re
    import sys
    module = sys.modules.get(package)
    if module is not None:
        return str(getattr(module, "__version__", ""))
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        version_file = Path(location) / "version.py"
        if version_file.is_file():
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", version_file.read_text("utf-8"), re.M)
            if found:
                return found.group(1)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def manifest_sha256(features_dir: Path) -> str:
    """sha256 of features/manifest.json's bytes: what later stages record as lineage."""
    from .atomic import sha256_file
    from .remote import localize_features
    path = localize_features(features_dir) / MANIFEST_NAME
    if not path.is_file():
        raise PrepError(f"{path}: no features manifest; run `prep extract-regions` first")
    return sha256_file(path)


# ------------------------------------------------ resume rules shared by every writer of features/

def parameter_fingerprints(out: Path) -> set[str]:
    """Fingerprints of the parameters that made whatever is already in `out` (manifest, shards)."""
    found = set()
    out = Path(out)
    candidates = [out / MANIFEST_NAME]
    if (out / SHARDS_DIR).is_dir():
        candidates += sorted((out / SHARDS_DIR).glob("regions-*.json"))
    for path in candidates:
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        value = data.get("parameters_fingerprint", data.get("params_fingerprint"))
        if value:
            found.add(value)
    return found


def prepare_output(out: Path, params_fp: str, overwrite: bool) -> None:
    """Empties `out` with overwrite; otherwise refuses outputs made with other parameters."""
    out = Path(out)
    if overwrite:
        for name in (MANIFEST_NAME, INDEX_NAME):
            (out / name).unlink(missing_ok=True)
        if (out / SHARDS_DIR).is_dir():
            import shutil
            shutil.rmtree(out / SHARDS_DIR)
        return
    stale = parameter_fingerprints(out) - {params_fp}
    if stale:
        raise PrepError(f"{out}: holds features made with other parameters (fingerprint "
                        f"{sorted(stale)[0]}, now {params_fp}); use another OUT or pass "
                        "--overwrite to start afresh")


def completed_shard(h5_path: Path, params_fp: str, same_plan, size: int | None = None) -> dict | None:
    """The stats of a shard completed with these parameters and `same_plan(stats)` true, else None.
    `size`: the shard's size when it is not at h5_path (an object at a URL; -1 when absent)."""
    h5_path = Path(h5_path)
    try:
        stats = json.loads(h5_path.with_suffix(".json").read_text("utf-8"))
        size = h5_path.stat().st_size if size is None else size
    except (OSError, ValueError):
        return None
    if stats.get("params_fingerprint") != params_fp or size != stats.get("bytes") or not same_plan(stats):
        return None
    return stats


def current_manifest(out: Path, params_fp: str, listing_sha256: str) -> dict | None:
    """The manifest when `out` is complete for these parameters and this input listing."""
    try:
        manifest = json.loads((Path(out) / MANIFEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if (manifest.get("parameters_fingerprint") == params_fp
            and manifest.get("input", {}).get("listing_sha256") == listing_sha256
            and (Path(out) / INDEX_NAME).is_file()):
        return manifest
    return None
