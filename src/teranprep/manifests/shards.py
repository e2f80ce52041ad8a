"""The HDF5 region shard: one file, many images in key order, ragged boxes addressed by offsets.

Layout (docs/FORMATS.md):
    attrs     format, format_version, feature_dim, detector, weights_sha256, params_fingerprint
    image_keys (N,) utf-8; image_size (N,2) int32 width,height; offsets (N+1,) int64
    features (B,D) float16|float32; boxes (B,4) float32 x1,y1,x2,y2 original pixels
    class_ids, class_scores, attr_ids, attr_scores (B,) when the detector has them
"""

from __future__ import annotations

import os
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
_IOV_MAX = 1024  # Linux's limit on buffers per preadv call


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


class _RawColumn:
    """Where each row of one dataset lies in the file, so rows can be read with os.preadv.

    Only for uncompressed datasets, contiguous or chunked along rows with whole rows per chunk
    (what ShardWriter writes: chunks of _CHUNK_ROWS rows). `of(ds)` is None for anything else
    (filters, compact layout, unallocated chunks); those datasets are read through h5py.
    """

    def __init__(self, dtype: np.dtype, row_shape: tuple, chunk_rows: int, bases: np.ndarray):
        self.dtype, self.row_shape = dtype, row_shape
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        self.chunk_rows = chunk_rows  # 0: contiguous, bases[0] is the dataset's offset
        self.bases = bases.tolist()   # file offset of each chunk (python ints: cheap to index)

    @classmethod
    def of(cls, ds: h5py.Dataset) -> "_RawColumn | None":
        dsid, row_shape = ds.id, ds.shape[1:]
        if dsid.get_create_plist().get_nfilters() or ds.dtype.hasobject:
            return None
        if ds.shape[0] == 0:  # nothing will ever be read
            return cls(ds.dtype, row_shape, 0, np.zeros(1, np.int64))
        if ds.chunks is None:
            offset = dsid.get_offset()
            return None if offset is None else cls(ds.dtype, row_shape, 0, np.array([offset]))
        if tuple(ds.chunks[1:]) != tuple(row_shape):
            return None
        chunk_rows = int(ds.chunks[0])
        n_chunks = -(-ds.shape[0] // chunk_rows)
        bases = np.full(n_chunks, -1, np.int64)
        chunk_bytes = chunk_rows * int(np.prod(row_shape, dtype=np.int64)) * ds.dtype.itemsize
        sound = [True]

        def visit(info):
            if info.filter_mask or info.size != chunk_bytes:
                sound[0] = False
            bases[info.chunk_offset[0] // chunk_rows] = info.byte_offset
        try:
            dsid.chunk_iter(visit)
        except (AttributeError, NotImplementedError):  # HDF5 < 1.12.3: one call per chunk
            for index in range(dsid.get_num_chunks()):
                visit(dsid.get_chunk_info(index))
        if not sound[0] or (bases < 0).any():
            return None
        return cls(ds.dtype, row_shape, chunk_rows, bases)

    def segments(self, lo: int, hi: int):
        """(file offset, rows) pieces that hold rows lo..hi-1, in row order."""
        if hi <= lo:
            return []
        if not self.chunk_rows:
            return [(self.bases[0] + lo * self.row_bytes, hi - lo)]
        cr, rb, out = self.chunk_rows, self.row_bytes, []
        while lo < hi:
            chunk, within = divmod(lo, cr)
            take = min(hi - lo, cr - within)
            out.append((self.bases[chunk] + within * rb, take))
            lo += take
        return out


def _pread_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fills `buffer` from `fd` at `offset` (preadv may return early; a short file is an error)."""
    while len(buffer):
        n = os.preadv(fd, [buffer], offset)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        buffer, offset = buffer[n:], offset + n


def _preadv_all(fd: int, buffers: list, offset: int, total: int) -> None:
    """Fills `buffers` (`total` bytes) in turn from one stretch of `fd` starting at `offset`."""
    n = os.preadv(fd, buffers, offset) if len(buffers) <= _IOV_MAX else 0
    if n == total:
        return
    for buffer in buffers:  # whatever a short read (or too many buffers) left over, one by one
        size = len(buffer)
        if n >= size:
            n -= size
        else:
            _pread_into(fd, buffer[n:], offset + n)
            n = 0
        offset += size


class ShardReader:
    """Random access into one shard; reads only the rows of the images asked for.

    The metadata (keys, sizes, offsets) and where every dataset's rows lie in the file are read
    once at open. Rows of uncompressed datasets are then read with os.preadv straight into numpy
    arrays: no HDF5 call per image. Anything else (compressed shards written by other tools)
    goes through h5py. After a fork the file is reopened on first use in the child, so a reader
    can be shared with DataLoader workers; it also pickles (without its handles).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._pid = os.getpid()
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
        self._bounds = self.offsets.tolist()
        self._sizes = [(int(w), int(h)) for w, h in self.image_size]
        self._raw = {name: _RawColumn.of(self._h5[name]) for name in ("features", "boxes", *self.columns)}
        self._fd = os.open(self.path, os.O_RDONLY)
        if all(raw is not None for raw in self._raw.values()):
            # Nothing more to ask HDF5: no library handle for a fork to inherit.
            self._h5.close()
            self._h5 = None

    def __len__(self) -> int:
        return len(self.image_keys)

    def row_of(self, key: str) -> int:
        return self._row_of[key]

    def image_size_of(self, row: int) -> tuple[int, int]:
        return self._sizes[row]

    # -------------------------------------------------------------------------- handles
    def _handles(self) -> int:
        if os.getpid() != self._pid:  # a forked or unpickled copy: HDF5 handles must not cross a fork
            if self._fd is not None:
                os.close(self._fd)  # the child's copy of the parent's descriptor
            self._h5 = None
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _file(self) -> h5py.File:
        self._handles()
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_h5=None, _fd=None, _pid=None)
        return state

    # -------------------------------------------------------------------------- reads
    def _rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        raw = self._raw[name]
        if raw is None:
            return self._file()[name][lo:hi]
        out = np.empty((hi - lo, *raw.row_shape), raw.dtype)
        view, fd, rb, pos = memoryview(out.reshape(-1).view(np.uint8)), self._handles(), raw.row_bytes, 0
        for offset, rows in raw.segments(lo, hi):
            _pread_into(fd, view[pos:pos + rows * rb], offset)
            pos += rows * rb
        return out

    def _span(self, row: int, max_rows: int | None):
        lo, hi = self._bounds[row], self._bounds[row + 1]
        return lo, (hi if max_rows is None else min(hi, lo + max_rows))

    def read(self, row: int) -> Regions:
        lo, hi = self._span(row, None)
        width, height = self._sizes[row]
        extra = {c: self._rows(c, lo, hi) for c in self.columns}
        return Regions(self.image_keys[row], width, height, self._rows("boxes", lo, hi),
                       self._rows("features", lo, hi), **extra)

    def read_columns(self, row: int, names=("features",), max_rows: int | None = None) -> list[np.ndarray]:
        """The named datasets' rows of one image (at most `max_rows` of them): the training path,
        which needs features and boxes but not class or attribute columns."""
        lo, hi = self._span(row, max_rows)
        return [self._rows(name, lo, hi) for name in names]

    def read_features(self, row: int, max_rows: int | None = None) -> np.ndarray:
        return self.read_columns(row, ("features",), max_rows)[0]

    def read_many(self, rows, names=None, max_rows: int | None = None) -> list:
        """Many images at once, in the order of `rows` (repeats allowed): each row is read once,
        in file order, and rows that are neighbours in the file in one preadv call.
        `names` None gives Regions; a tuple of dataset names gives lists of arrays as read_columns.
        """
        rows = [int(r) for r in rows]
        unique = sorted(set(rows))
        spans = [self._span(r, max_rows) for r in unique]
        wanted = ("features", "boxes", *self.columns) if names is None else tuple(names)
        # One array per image and dataset (one big buffer would be fresh mmap'd memory, page
        # faulted in on every call, and slower than the reads themselves).
        arrays = {r: [] for r in unique}
        for name in wanted:
            for r, array in zip(unique, self._rows_many(name, spans)):
                arrays[r].append(array)
        seen, out = set(), []
        for r in rows:
            got = arrays[r]
            if r in seen:  # a repeated row gets its own copy: callers may modify what they get
                got = [a.copy() for a in got]
            seen.add(r)
            if names is None:
                width, height = self._sizes[r]
                feats, boxes, *extra = got
                out.append(Regions(self.image_keys[r], width, height, boxes, feats,
                                   **dict(zip(self.columns, extra))))
            else:
                out.append(list(got))
        return out

    def _rows_many(self, name: str, spans) -> list[np.ndarray]:
        raw = self._raw[name]
        if raw is None:
            ds = self._file()[name]
            return [ds[lo:hi] for lo, hi in spans]
        fd, rb, shape, dtype = self._handles(), raw.row_bytes, raw.row_shape, raw.dtype
        cr, bases = raw.chunk_rows, raw.bases
        out, run_offset, run_end, run_buffers = [], -1, -1, []
        # segments() inlined: this loop runs once per image and dataset of every batch.
        for lo, hi in spans:
            array = np.empty((hi - lo, *shape), dtype)
            out.append(array)
            if hi == lo:
                continue
            view, pos = memoryview(array).cast("B"), 0
            while lo < hi:
                if cr:
                    chunk, within = divmod(lo, cr)
                    take = min(cr - within, hi - lo)
                    offset = bases[chunk] + within * rb
                else:
                    take, offset = hi - lo, bases[0] + lo * rb
                size = take * rb
                if offset != run_end:  # not where the previous piece ended: start a new read
                    if run_buffers:
                        _preadv_all(fd, run_buffers, run_offset, run_end - run_offset)
                    run_offset, run_buffers = offset, []
                run_buffers.append(view[pos:pos + size])
                run_end, pos, lo = offset + size, pos + size, lo + take
        if run_buffers:
            _preadv_all(fd, run_buffers, run_offset, run_end - run_offset)
        return out

    def dataset(self, name: str) -> h5py.Dataset:
        return self._file()[name]

    def close(self) -> None:
        inherited = self._pid != os.getpid()
        if self._h5 is not None and not inherited:  # a parent's HDF5 handle is left alone
            self._h5.close()
        if self._fd is not None:
            os.close(self._fd)
        self._h5, self._fd, self._pid = None, None, os.getpid()

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

