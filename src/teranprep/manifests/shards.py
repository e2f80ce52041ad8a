"""The HDF5 region shard: one file, many images in key order, ragged boxes addressed by offsets.

Layout (docs/FORMATS.md):
    attrs     format, format_version, feature_dim, detector, weights_sha256, params_fingerprint
    image_keys (N,) utf-8; image_size (N,2) int32 width,height; offsets (N+1,) int64
    features (B,D) float16|float32; boxes (B,4) float32 x1,y1,x2,y2 original pixels
    class_ids, class_scores, attr_ids, attr_scores (B,) when the detector has them
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .atomic import commit_temp, temp_path_for

REGIONS_FORMAT = "teranprep.regions"
REGIONS_FORMAT_VERSION = 1
FLOAT16_MAX = float(np.finfo(np.float16).max)
OPTIONAL_COLUMNS = ("class_ids", "class_scores", "attr_ids", "attr_scores")
_COLUMN_DTYPES = {"boxes": np.float32, "class_ids": np.int32, "class_scores": np.float32,
                  "attr_ids": np.int32, "attr_scores": np.float32}
# Rows per HDF5 chunk: small enough that reading one image touches little more than its own rows.
_CHUNK_ROWS = 64


@dataclass
class Regions:
    """The regions of one image. Optional fields are None when the detector does not produce them."""

    image_key: str
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2 in original pixels
    features: np.ndarray  # (n, D)
    class_ids: np.ndarray | None = None
    class_scores: np.ndarray | None = None
    attr_ids: np.ndarray | None = None
    attr_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class ShardWriter:
    """Appends images to a shard under a temporary name; `close()` renames it into place.

    A shard that was not closed does not exist: its temporary file is ignored (and removed by the
    next run). Datasets are written without timestamps so the same input gives the same bytes.
    """

    def __init__(self, path: Path, *, feature_dim: int, dtype: str, attrs: dict,
                 optional_columns=OPTIONAL_COLUMNS):
        self.path = Path(path)
        self.tmp = temp_path_for(self.path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float16, np.float32):
            raise ValueError(f"feature dtype must be float16 or float32, not {dtype}")
        self.feature_dim = int(feature_dim)
        self.columns = tuple(optional_columns)
        self._keys: list[str] = []
        self._sizes: list[tuple[int, int]] = []
        self._offsets = [0]
        self._h5 = h5py.File(self.tmp, "w", libver=("earliest", "v110"), track_order=False)
        self._h5.attrs.update({"format": REGIONS_FORMAT, "format_version": REGIONS_FORMAT_VERSION,
                               "feature_dim": self.feature_dim, **attrs})
        self._ds = {"features": self._grow_ds("features", (self.feature_dim,), self.dtype)}
        self._ds["boxes"] = self._grow_ds("boxes", (4,), np.float32)
        for col in self.columns:
            self._ds[col] = self._grow_ds(col, (), _COLUMN_DTYPES[col])

    def _grow_ds(self, name, tail, dtype):
        return self._h5.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                                       chunks=(_CHUNK_ROWS, *tail), track_times=False)

    @staticmethod
    def check_representable(features: np.ndarray, dtype) -> str | None:
        """None when `features` fits `dtype`, else a message (float16 overflows above 65504)."""
        if not np.all(np.isfinite(features)):
            return "detector produced non-finite feature values"
        if np.dtype(dtype) == np.float16 and features.size:
            peak = float(np.abs(features).max())
            if peak > FLOAT16_MAX:
                return (f"feature value {peak:.4g} is out of float16 range (max {FLOAT16_MAX:.0f}); "
                        "use --dtype float32")
        return None

    def append(self, regions: Regions) -> int:
        """Adds one image; returns its row in the shard. Keys must arrive in sorted order."""
        if self._keys and regions.image_key <= self._keys[-1]:
            raise ValueError(f"image keys must be appended in sorted order: {regions.image_key!r}")
        n = len(regions)
        if regions.features.shape != (n, self.feature_dim):
            raise ValueError(f"{regions.image_key}: features shape {regions.features.shape}, "
                             f"expected ({n}, {self.feature_dim})")
        start = self._offsets[-1]
        values = {"features": regions.features.astype(self.dtype, copy=False),
                  "boxes": regions.boxes}
        for col in self.columns:
            arr = getattr(regions, col)
            values[col] = arr if arr is not None else np.full(n, -1 if "ids" in col else 0)
        for name, arr in values.items():
            ds = self._ds[name]
            ds.resize(start + n, axis=0)
            if n:
                ds[start:start + n] = np.asarray(arr).astype(ds.dtype, copy=False)
        self._keys.append(regions.image_key)
        self._sizes.append((int(regions.width), int(regions.height)))
        self._offsets.append(start + n)
        return len(self._keys) - 1

    @property
    def n_images(self) -> int:
        return len(self._keys)

    @property
    def n_boxes(self) -> int:
        return self._offsets[-1]

    def close(self) -> None:
        h5 = self._h5
        h5.create_dataset("image_keys", data=np.array(self._keys, dtype=object),
                          dtype=h5py.string_dtype("utf-8"), track_times=False)
        h5.create_dataset("image_size", data=np.array(self._sizes, dtype=np.int32).reshape(-1, 2),
                          track_times=False)
        h5.create_dataset("offsets", data=np.array(self._offsets, dtype=np.int64), track_times=False)
        h5.close()
        commit_temp(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self._h5.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardReader:
    """Random access into one shard; reads only the rows of the image asked for."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._h5 = h5py.File(self.path, "r")
        attrs = self._h5.attrs
        if attrs.get("format") != REGIONS_FORMAT:
            self._h5.close()
            raise ValueError(f"{self.path}: not a teranprep regions shard (format attribute "
                             f"{attrs.get('format')!r})")
        self.attrs = dict(attrs)
        self.offsets = self._h5["offsets"][:]
        self.image_keys = [k.decode() if isinstance(k, bytes) else k
                           for k in self._h5["image_keys"][:]]
        self.image_size = self._h5["image_size"][:]
        self.columns = [c for c in OPTIONAL_COLUMNS if c in self._h5]
        self._row_of = {k: i for i, k in enumerate(self.image_keys)}

    def __len__(self) -> int:
        return len(self.image_keys)

    def row_of(self, key: str) -> int:
        return self._row_of[key]

    def read(self, row: int) -> Regions:
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        extra = {c: self._h5[c][lo:hi] for c in self.columns}
        width, height = (int(v) for v in self.image_size[row])
        return Regions(self.image_keys[row], width, height, self._h5["boxes"][lo:hi],
                       self._h5["features"][lo:hi], **extra)

    def dataset(self, name: str) -> h5py.Dataset:
        return self._h5[name]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shard_name(index: int) -> str:
    return f"regions-{index:05d}.h5"


def remove_stale_temps(directory: Path) -> list[Path]:
    """Deletes temporary files left by killed writers; returns what it removed."""
    from .atomic import is_temp_file
    removed = []
    if directory.is_dir():
        for p in directory.iterdir():
            if is_temp_file(p):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed

