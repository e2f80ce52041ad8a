"""Readers of the community feature formats: list a source cheaply, then read one image at a time.

A source lists SourceItems (an id and a small JSON-able locator: a byte offset, a file, an array
row) without reading any features, so the importer can sort by key and read rows in key order;
`read` decodes one item into Regions or raises ItemError for a malformed one.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ItemError, PrepError
from ...manifests.shards import Regions

# Caffe's TSV rows hold ~400 kB of base64 in one field; csv's default limit is 128 kB.
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


@dataclass(frozen=True)
class SourceItem:
    source_id: str
    locator: tuple  # format-specific, JSON-able: where the item's bytes are
    error: str = ""  # a problem already found while listing (the item is recorded, not read)


def _b64_array(text: str, dtype, what: str, source_id: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ItemError(f"{source_id}: field {what} is not valid base64 ({exc})") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise ItemError(f"{source_id}: field {what} holds {len(raw)} bytes, not a whole number of "
                        f"{np.dtype(dtype).name} values")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def _int_field(text: str, what: str, source_id: str) -> int:
    try:
        return int(float(text)) if "." in text else int(text)
    except ValueError:
        raise ItemError(f"{source_id}: field {what} is not a number ({text[:30]!r})") from None


def _size_value(value, what: str, where) -> int:
    """An image width/height stored as a number; a NaN, inf or non-number is an item error."""
    try:
        number = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise ItemError(f"{where}: {what} is not a number ({value!r})") from None
    if not np.isfinite(number):
        raise ItemError(f"{where}: {what} is {number} (non-finite image size)")
    return int(number)


# ------------------------------------------------------------------------------------ TSV

class TsvSource:
    """butd-tsv (Caffe generate_tsv.py) and lxmert-tsv rows: no header, tab separated, base64 arrays.

    SRC is one TSV file or a directory of them (every file whose name contains `.tsv`, e.g. the
    per-GPU `x.tsv.0`, `x.tsv.1`). Listing reads each line once for its id and byte offset.
    """

    FIELDS = {
        "butd-tsv": ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
        "lxmert-tsv": ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                       "attrs_conf", "num_boxes", "boxes", "features"),
    }
    # lxmert's loader decodes objects_id/attrs_id as int64 and the confidences as float32.
    LXMERT_COLUMNS = (("objects_id", "class_ids", np.int64), ("objects_conf", "class_scores", np.float32),
                      ("attrs_id", "attr_ids", np.int64), ("attrs_conf", "attr_scores", np.float32))

    def __init__(self, fmt: str, src: Path):
        self.fmt = fmt
        self.src = Path(src)
        self.fields = self.FIELDS[fmt]
        self.columns = ("class_ids", "class_scores", "attr_ids", "attr_scores") if fmt == "lxmert-tsv" else ()
        if self.src.is_dir():
            self.files = sorted(p for p in self.src.iterdir() if p.is_file() and ".tsv" in p.name)
            self.root = self.src
        elif self.src.is_file():
            self.files, self.root = [self.src], self.src.parent
        else:
            raise PrepError(f"{self.src}: not found; pass a {fmt} file or a directory of them")
        if not self.files:
            raise PrepError(f"{self.src}: no file with `.tsv` in its name; pass the TSV file itself")
        self._handles: dict[str, object] = {}
        self.feature_dim = 0
        self.notes = {"files": [p.name for p in self.files]}

    def signature(self) -> list:
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]

    def items(self) -> list[SourceItem]:
        out = []
        for path in self.files:
            stat = path.stat()
            offset = 0
            with open(path, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    length = len(line)
                    if line.strip():
                        tab = line.find(b"\t")
                        raw_id = (line[:tab] if tab >= 0 else line.rstrip(b"\r\n")).decode("utf-8", "replace")
                        if raw_id.startswith('"'):
                            raw_id = next(csv.reader([line.decode("utf-8", "replace")], delimiter="\t"))[0]
                        locator = (path.name, stat.st_size, stat.st_mtime_ns, offset, length, lineno)
                        if not raw_id.strip():
                            out.append(SourceItem(f"{path.name}:line{lineno}", locator,
                                                  f"{path.name} line {lineno}: empty image id"))
                        else:
                            out.append(SourceItem(raw_id.strip(), locator))
                    offset += length
        self.feature_dim = self._probe_dim(out)
        return out

    def _probe_dim(self, items) -> int:
        for item in items[:200]:
            if item.error:
                continue
            try:
                fields = self._fields(item)
                n = _int_field(fields["num_boxes"], "num_boxes", item.source_id)
                feats = _b64_array(fields["features"], np.float32, "features", item.source_id)
            except ItemError:
                continue
            if n > 0 and feats.size % n == 0:
                return feats.size // n
        raise PrepError(f"{self.src}: none of the first {min(len(items), 200)} rows is a readable "
                        f"{self.fmt} row ({len(self.fields)} tab-separated fields: "
                        f"{', '.join(self.fields)}); check the format name")

    def _fields(self, item: SourceItem) -> dict:
        name, _, _, offset, length, lineno = item.locator
        fh = self._handles.get(name)
        if fh is None:
            fh = self._handles[name] = open(self.root / name, "rb")
        fh.seek(offset)
        line = fh.read(length).decode("utf-8", "replace").rstrip("\r\n")
        values = next(csv.reader([line], delimiter="\t"))
        if len(values) != len(self.fields):
            raise ItemError(f"{item.source_id} ({name} line {lineno}): {len(values)} fields, a "
                            f"{self.fmt} row has {len(self.fields)}")
        return dict(zip(self.fields, values))

    def read(self, item: SourceItem, key: str) -> Regions:
        fields = self._fields(item)
        sid = item.source_id
        n = _int_field(fields["num_boxes"], "num_boxes", sid)
        if n < 0:
            raise ItemError(f"{sid}: num_boxes is {n}")
        width = _int_field(fields["img_w" if self.fmt == "lxmert-tsv" else "image_w"], "width", sid)
        height = _int_field(fields["img_h" if self.fmt == "lxmert-tsv" else "image_h"], "height", sid)
        boxes = _b64_array(fields["boxes"], np.float32, "boxes", sid)
        feats = _b64_array(fields["features"], np.float32, "features", sid)
        if boxes.size != n * 4:
            raise ItemError(f"{sid}: num_boxes is {n} but boxes holds {boxes.size} values, not {n * 4}")
        if feats.size != n * self.feature_dim:
            raise ItemError(f"{sid}: num_boxes is {n} but features holds {feats.size} values, not "
                            f"{n} x {self.feature_dim}")
        extra = {}
        for field, column, dtype in (self.LXMERT_COLUMNS if self.fmt == "lxmert-tsv" else ()):
            values = _b64_array(fields[field], dtype, field, sid)
            if values.size != n:
                raise ItemError(f"{sid}: num_boxes is {n} but {field} holds {values.size} values")
            extra[column] = values
        return Regions(key, width, height, boxes.reshape(n, 4), feats.reshape(n, self.feature_dim), **extra)

    def close(self):
        for fh in self._handles.values():
            fh.close()
        self._handles = {}


# ------------------------------------------------------------------------------------ npz folders

def _listing(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.name.startswith("."))


def _id_of(path: Path, root: Path, suffix: str) -> str:
    rel = path.relative_to(root).as_posix()
    return rel[: -len(suffix)]


def _file_sig(path: Path) -> tuple:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns)


def read_npy_member(npz: zipfile.ZipFile, name: str):
    """An object-dtype array member of an .npz, unpickled through teranprep.safe_pickle.

    numpy stores such a member as the .npy header followed by a pickle of the array; np.load would
    need allow_pickle=True, which runs whatever the pickle names.
    """
    from ...safe_pickle import safe_loads
    with npz.open(f"{name}.npy") as fh:
        data = fh.read()
    buf = io.BytesIO(data)
    version = np.lib.format.read_magic(buf)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    shape, _, dtype = reader(buf)
    if not dtype.hasobject:
        buf.seek(0)
        return np.lib.format.read_array(buf, allow_pickle=False)
    return safe_loads(data[buf.tell():], source=f"{npz.filename}:{name}")


class BuaNpzSource:
    """MILVLG bottom-up-attention.pytorch: one <id>.npz per image with x, bbox, num_bbox, image_h,
    image_w and a pickled `info` dict (objects_id, objects_conf, attrs_id, attrs_conf)."""

    INFO_COLUMNS = (("objects_id", "class_ids"), ("objects_conf", "class_scores"),
                    ("attrs_id", "attr_ids"), ("attrs_conf", "attr_scores"))

    def __init__(self, src: Path):
        self.src = Path(src)
        if not self.src.is_dir():
            raise PrepError(f"{self.src}: not a directory; pass the folder of MILVLG .npz files")
        self.files = _listing(self.src, "*.npz")
        if not self.files:
            raise PrepError(f"{self.src}: no .npz files found (searched recursively)")
        self.feature_dim = 0
        self.columns: tuple = ()
        self.notes = {}

    def signature(self) -> list:
        return [len(self.files)]

    def items(self) -> list[SourceItem]:
        items = [SourceItem(_id_of(p, self.src, ".npz"),
                            (p.relative_to(self.src).as_posix(), *_file_sig(p))) for p in self.files]
        # Feature width and which info columns exist come from the first readable file.
        for item in items[:50]:
            try:
                data = self._load(item)
            except (ItemError, PrepError):
                continue
            self.feature_dim = int(data["x"].shape[1])
            info = data.get("info") or {}
            self.columns = tuple(col for field, col in self.INFO_COLUMNS if field in info)
            return items
        raise PrepError(f"{self.src}: none of the first {min(len(items), 50)} .npz files is a "
                        "readable MILVLG file (members x, bbox, num_bbox, image_h, image_w)")

    def _load(self, item: SourceItem) -> dict:
        path = self.src / item.locator[0]
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in ("x", "bbox", "num_bbox", "image_h", "image_w")}
                data["info"] = None
                if "info" in npz.files:
                    info = read_npy_member(npz.zip, "info")
                    info = info.item() if isinstance(info, np.ndarray) and info.shape == () else info
                    if not isinstance(info, dict):
                        raise ItemError(f"{path}: `info` is a {type(info).__name__}, not a dict")
                    data["info"] = info
        except PrepError as exc:  # a refused pickle: this file is recorded as an error
            raise ItemError(str(exc)) from None
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ItemError(f"{path}: not a readable MILVLG .npz ({type(exc).__name__}: {exc})") from None
        return data

    def read(self, item: SourceItem, key: str) -> Regions:
        data = self._load(item)
        path = self.src / item.locator[0]
        feats, boxes = np.asarray(data["x"]), np.asarray(data["bbox"], np.float32)
        n = int(data["num_bbox"])
        if feats.ndim != 2 or feats.shape != (n, self.feature_dim):
            raise ItemError(f"{path}: x has shape {feats.shape}, expected ({n}, {self.feature_dim}) "
                            "from num_bbox")
        if boxes.shape != (n, 4):
            raise ItemError(f"{path}: bbox has shape {boxes.shape}, expected ({n}, 4) from num_bbox")
        extra = {}
        info = data["info"] or {}
        for field, column in self.INFO_COLUMNS:
            if column in self.columns and field in info:
                values = np.asarray(info[field]).reshape(-1)
                if values.size != n:
                    raise ItemError(f"{path}: info[{field!r}] has {values.size} values, num_bbox is {n}")
                extra[column] = values
        return Regions(key, _size_value(data["image_w"], "image_w", path),
                       _size_value(data["image_h"], "image_h", path), boxes, feats, **extra)

    def close(self):
        pass


def read_sizes_csv(path: Path) -> dict[str, tuple[int, int]]:
    """A size file: CSV with header id,width,height (what `export-features --to teran` writes)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not {"id", "width", "height"} <= set(reader.fieldnames or ()):
                raise PrepError(f"{path}: a size file needs the header id,width,height")
            return {row["id"]: (int(row["width"]), int(row["height"])) for row in reader}
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: unreadable size file ({exc}); expected CSV id,width,height") from exc


SIZES_FILE = "image_sizes.csv"


class TeranSource:
    """TERAN's own layout: bu_att/<id>.npz ('feat', K x D) and bu_box/<id>.npy (K x 4 pixels).

    The format has no image sizes: they come from --sizes, else SRC/image_sizes.csv when present
    (export-features writes it), else width = height = -1 (unknown).
    """

    def __init__(self, src: Path, sizes: Path | None = None):
        self.src = Path(src)
        self.att, self.box = self.src / "bu_att", self.src / "bu_box"
        if not self.att.is_dir():
            raise PrepError(f"{self.att}: missing; pass the folder that holds bu_att/ and bu_box/")
        self.files = _listing(self.att, "*.npz")
        if not self.files:
            raise PrepError(f"{self.att}: no .npz files found")
        size_file = Path(sizes) if sizes else (self.src / SIZES_FILE)
        self.sizes = read_sizes_csv(size_file) if (sizes or size_file.is_file()) else {}
        self.notes = {"sizes": str(size_file) if self.sizes else "unknown: width = height = -1"}
        self.columns = ()
        self.feature_dim = 0

    def signature(self) -> list:
        return [len(self.files)]

    def items(self) -> list[SourceItem]:
        items = []
        for p in self.files:
            sid = _id_of(p, self.att, ".npz")
            box = self.box / f"{sid}.npy"
            error = "" if box.is_file() else f"{sid}: {box} is missing"
            items.append(SourceItem(sid, (f"{sid}", *_file_sig(p),
                                          *(_file_sig(box) if box.is_file() else (-1, -1)),
                                          *self.sizes.get(sid, (-1, -1))), error))
        for item in items[:50]:
            if not item.error:
                try:
                    self.feature_dim = int(self._feat(item).shape[1])
                    return items
                except (ItemError, IndexError):
                    continue
        raise PrepError(f"{self.att}: none of the first files holds a 2-D 'feat' array")

    def _feat(self, item):
        path = self.att / f"{item.source_id}.npz"
        try:
            with np.load(path, allow_pickle=False) as npz:
                return np.asarray(npz["feat"])
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ItemError(f"{path}: no readable 'feat' array ({type(exc).__name__}: {exc})") from None

    def read(self, item: SourceItem, key: str) -> Regions:
        feats = self._feat(item)
        path = self.box / f"{item.source_id}.npy"
        try:
            boxes = np.asarray(np.load(path, allow_pickle=False), np.float32)
        except (ValueError, OSError, EOFError) as exc:
            raise ItemError(f"{path}: unreadable boxes ({type(exc).__name__}: {exc})") from None
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ItemError(f"{self.att / item.source_id}.npz: feat shape {feats.shape}, expected "
                            f"(K, {self.feature_dim})")
        if boxes.shape != (feats.shape[0], 4):
            raise ItemError(f"{path}: shape {boxes.shape}, expected ({feats.shape[0]}, 4) to match feat")
        width, height = self.sizes.get(item.source_id, (-1, -1))
        return Regions(key, width, height, boxes, feats)

    def close(self):
        pass


# ------------------------------------------------------------------------------------ SCAN precomp

class NpyRows:
    """Row reads from a C-order .npy by file offset (os.pread): nothing is loaded or mapped.

    np.memmap would work too, but every page it touches stays in the process's resident set until
    the kernel needs the memory back, so reading a 33 GB array that way reports a 33 GB RSS.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            with open(self.path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                self.shape, fortran, self.dtype = reader(fh)
                self.offset = fh.tell()
        except ValueError as exc:
            os.close(self.fd)
            raise PrepError(f"{self.path}: not a .npy array ({exc})") from None
        if fortran or self.dtype.hasobject or not self.shape:
            os.close(self.fd)
            raise PrepError(f"{self.path}: needs a C-order numeric array with a leading row "
                            "axis; re-save it with np.save(np.ascontiguousarray(a))")
        self.row_shape = tuple(self.shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return int(self.shape[0])

    def read(self, i: int) -> np.ndarray:
        data = os.pread(self.fd, self.row_bytes, self.offset + i * self.row_bytes)
        if len(data) != self.row_bytes:
            raise ItemError(f"{self.path}: row {i} is truncated ({len(data)} of {self.row_bytes} bytes)")
        return np.frombuffer(data, self.dtype).reshape(self.row_shape)

    def close(self):
        os.close(self.fd)


# Names this toolkit reads and writes next to SCAN's {split}_ims.npy (SCAN itself has none):
SCAN_BOXES = "{split}_boxes.npy"   # (N, K, 4) float32 x1,y1,x2,y2 in original pixels
SCAN_SIZES = "{split}_sizes.npy"   # (N, 2) int32 width, height
SCAN_IMS, SCAN_IDS, SCAN_CAPS = "{split}_ims.npy", "{split}_ids.txt", "{split}_caps.txt"


class ScanPrecompSource:
    """SCAN precomp: {split}_ims.npy (N, K, D) with {split}_ids.txt (one id per row; without it the
    id is `{split}/{row}`), plus the optional {split}_boxes.npy and {split}_sizes.npy."""

    def __init__(self, src: Path, splits: tuple[str, ...] = ()):
        self.src = Path(src)
        if not self.src.is_dir():
            raise PrepError(f"{self.src}: not a directory; pass the folder with {{split}}_ims.npy")
        found = sorted(p.name[: -len("_ims.npy")] for p in self.src.glob("*_ims.npy"))
        self.splits = tuple(splits) or tuple(found)
        if not self.splits:
            raise PrepError(f"{self.src}: no {{split}}_ims.npy file found")
        self.ims, self.boxes, self.sizes, self.ids = {}, {}, {}, {}
        for split in self.splits:
            path = self.src / SCAN_IMS.format(split=split)
            if not path.is_file():
                raise PrepError(f"{path}: missing; splits found here: {', '.join(found) or 'none'}")
            ims = self.ims[split] = NpyRows(path)
            if len(ims.row_shape) != 2:
                raise PrepError(f"{path}: shape {ims.shape}, expected (N, K, D)")
            for table, name, shape in ((self.boxes, SCAN_BOXES, (*ims.shape[:2], 4)),
                                       (self.sizes, SCAN_SIZES, (ims.shape[0], 2))):
                extra = self.src / name.format(split=split)
                if extra.is_file():
                    table[split] = NpyRows(extra)
                    if tuple(table[split].shape) != shape:
                        raise PrepError(f"{extra}: shape {table[split].shape}, expected {shape} "
                                        f"to match {path.name}")
            self.ids[split] = self._read_ids(split, len(ims))
        dims = {self.ims[s].row_shape[1] for s in self.splits}
        if len(dims) != 1:
            raise PrepError(f"{self.src}: splits have different feature widths {sorted(dims)}")
        self.feature_dim = dims.pop()
        self.columns = ()
        self.notes = {"splits": list(self.splits),
                      "boxes": {s: (SCAN_BOXES.format(split=s) if s in self.boxes else "absent: zeros")
                                for s in self.splits},
                      "sizes": {s: (SCAN_SIZES.format(split=s) if s in self.sizes else "unknown: -1")
                                for s in self.splits}}

    def _read_ids(self, split: str, n: int) -> list[str]:
        path = self.src / SCAN_IDS.format(split=split)
        if not path.is_file():
            return [f"{split}/{i}" for i in range(n)]
        ids = path.read_text("utf-8").splitlines()
        while ids and not ids[-1].strip():
            ids.pop()
        if len(ids) != n:
            raise PrepError(f"{path}: {len(ids)} ids for {n} rows of "
                            f"{SCAN_IMS.format(split=split)}; the files must match line for row")
        return [i.strip() for i in ids]

    def signature(self) -> list:
        return [[s, *_file_sig(self.ims[s].path)] for s in self.splits]

    def items(self) -> list[SourceItem]:
        out = []
        for split in self.splits:
            sig = _file_sig(self.ims[split].path)
            for row, sid in enumerate(self.ids[split]):
                out.append(SourceItem(sid, (split, row, *sig)))
        return out

    def read(self, item: SourceItem, key: str) -> Regions:
        split, row = item.locator[0], item.locator[1]
        feats = self.ims[split].read(row)
        k = feats.shape[0]
        boxes = (self.boxes[split].read(row).astype(np.float32) if split in self.boxes
                 else np.zeros((k, 4), np.float32))
        width, height = (int(v) for v in self.sizes[split].read(row)) if split in self.sizes else (-1, -1)
        return Regions(key, width, height, boxes, feats)

    def close(self):
        for table in (self.ims, self.boxes, self.sizes):
            for rows in table.values():
                rows.close()


IMPORT_FORMATS = ("butd-tsv", "lxmert-tsv", "bua-npz", "teran", "scan-precomp", "vinvl-tsv")


def open_source(fmt: str, src: Path, *, sizes: Path | None = None, splits: tuple = ()):
    if fmt in TsvSource.FIELDS:
        return TsvSource(fmt, src)
    if fmt == "bua-npz":
        return BuaNpzSource(src)
    if fmt == "teran":
        return TeranSource(src, sizes)
    if fmt == "scan-precomp":
        return ScanPrecompSource(src, splits)
    if fmt == "vinvl-tsv":
        from .vinvl_tsv import VinvlTsvSource
        return VinvlTsvSource(src)
    raise PrepError(f"unknown feature format {fmt!r}; choose one of: {', '.join(IMPORT_FORMATS)}")
