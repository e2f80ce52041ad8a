"""VinVL's files (Oscar / ALADIN read them) and MMF's LMDB feature store: export, and vinvl-tsv import.

vinvl-tsv, a folder:
    features.tsv      one row per image: image_id, num_boxes, base64 float32 (num_boxes x D) C order
    features.lineidx  the byte offset of each row of features.tsv, one per line (Oscar's TSVFile)
    predictions.tsv   image_id, JSON {"image_h", "image_w", "objects": [{"rect": [x1, y1, x2, y2],
                      "class", "conf", "attr_ids", "attr_scores"}]} (+ predictions.lineidx)
    imageid2idx.json  {image_id: row of features.tsv} (Oscar's run_retrieval.py opens it)
Oscar and ALADIN read num_boxes from field 1 and the features from the last field; image ids must
be integers for their caption files (--key-map). "class" is the label map's name when a label map
is given, else the class id as text.

lmdb (MMF's tools/scripts/features/lmdb_conversion.py layout): key = image id (utf-8), value =
a pickled dict {feature_path, features (N, D) float32, image_height, image_width, num_boxes,
objects (class ids), cls_prob None, bbox (N, 4)}; key b"keys" = the pickled list of keys. Export
only: an LMDB's values are pickles, and this toolkit never unpickles foreign files.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import numpy as np

from ...errors import ItemError, PrepError
from ...manifests.atomic import atomic_write_json, commit_temp, temp_path_for
from ...manifests.shards import Regions

FEATURES_TSV, PREDICTIONS_TSV, ID_TO_ROW = "features.tsv", "predictions.tsv", "imageid2idx.json"
LMDB_NAME = "features.lmdb"


def lineidx_path(tsv: Path) -> Path:
    return tsv.with_suffix(".lineidx")


class _TsvWriter:
    """A TSV and its .lineidx, both under temporary names until commit."""

    def __init__(self, path: Path):
        self.path, self.idx = path, lineidx_path(path)
        self.tmp, self.idx_tmp = temp_path_for(path), temp_path_for(self.idx)
        self.fh, self.offsets = open(self.tmp, "wb"), []

    def row(self, *fields: str) -> None:
        self.offsets.append(self.fh.tell())
        self.fh.write(("\t".join(fields) + "\n").encode("utf-8"))

    def commit(self) -> list[str]:
        self.fh.close()
        self.idx_tmp.write_bytes("".join(f"{o}\n" for o in self.offsets).encode())
        commit_temp(self.tmp, self.path)
        commit_temp(self.idx_tmp, self.idx)
        return [self.path.name, self.idx.name]

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)
        self.idx_tmp.unlink(missing_ok=True)


def _objects(r: Regions, class_names) -> list[dict]:
    out = []
    for i in range(len(r)):
        obj = {"rect": [float(v) for v in r.boxes[i]]}
        if r.class_ids is not None:
            cid = int(r.class_ids[i])
            obj["class"] = class_names[cid + 1] if class_names and 0 <= cid + 1 < len(class_names) else str(cid)
        if r.class_scores is not None:
            obj["conf"] = float(r.class_scores[i])
        if r.attr_ids is not None:
            obj["attr_ids"] = [int(r.attr_ids[i])] if r.attr_ids[i] >= 0 else []
            obj["attr_scores"] = [float(r.attr_scores[i])] if r.attr_ids[i] >= 0 else []
        out.append(obj)
    return out


def export_vinvl_tsv(store, keys, ids, out: Path, bar, label_map: Path | None = None) -> list[str]:
    class_names = None
    if label_map is not None:
        from ...extractors.vinvl.checkpoint import read_label_map
        class_names = read_label_map(label_map)[0]
    feats, preds = _TsvWriter(out / FEATURES_TSV), _TsvWriter(out / PREDICTIONS_TSV)
    try:
        for key, sid in zip(keys, ids):
            r = store[key]
            feats.row(sid, str(len(r)), base64.b64encode(np.asarray(r.features, "<f4").tobytes()).decode())
            preds.row(sid, json.dumps({"image_h": int(r.height), "image_w": int(r.width),
                                       "objects": _objects(r, class_names)}, separators=(",", ":")))
            bar.update(1)
    except BaseException:
        feats.abort()
        preds.abort()
        raise
    files = feats.commit() + preds.commit()
    atomic_write_json(out / ID_TO_ROW, {sid: i for i, sid in enumerate(ids)})
    return files + [ID_TO_ROW]


def export_lmdb(store, keys, ids, out: Path, bar) -> list[str]:
    try:
        import lmdb
    except ImportError as exc:  # a declared dependency; only a broken install lacks it
        raise PrepError("export-features --to lmdb needs the `lmdb` package (pip install lmdb)") from exc
    target = out / LMDB_NAME
    if target.exists():
        raise PrepError(f"{target}: exists; remove it (or export to another folder)")
    tmp = temp_path_for(target)
    size = sum(store.index.loc[store.index["status"] == "ok", "num_boxes"]) * (store.feature_dim + 8) * 4
    env = lmdb.open(str(tmp), map_size=max(1 << 24, int(size * 1.5) + (len(keys) << 12)), subdir=True)
    try:
        with env.begin(write=True) as txn:
            for key, sid in zip(keys, ids):
                r = store[key]
                item = {"feature_path": sid, "features": np.asarray(r.features, np.float32),
                        "image_height": int(r.height), "image_width": int(r.width), "num_boxes": len(r),
                        "objects": None if r.class_ids is None else np.asarray(r.class_ids, np.int64),
                        "cls_prob": None, "bbox": np.asarray(r.boxes, np.float32)}
                txn.put(sid.encode("utf-8"), pickle.dumps(item, protocol=4))
                bar.update(1)
            txn.put(b"keys", pickle.dumps([sid.encode("utf-8") for sid in ids], protocol=4))
        env.sync(True)
        env.close()
        os.replace(tmp, target)  # a directory (data.mdb + lock.mdb), complete only once renamed
    except BaseException:
        env.close()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [LMDB_NAME + "/"]


class VinvlTsvSource:
    """import-features vinvl-tsv: SRC is the folder (features.tsv + predictions.tsv). Rows are
    found through features.lineidx when present (checked against the file), else by a scan.
    Boxes, sizes and class scores come from predictions.tsv (class names are kept out: they are
    not ids)."""

    columns = ("class_scores",)

    def __init__(self, src: Path):
        self.src = Path(src)
        self.tsv, self.pred = self.src / FEATURES_TSV, self.src / PREDICTIONS_TSV
        for path in (self.tsv, self.pred):
            if not path.is_file():
                raise PrepError(f"{path}: not found; vinvl-tsv SRC is a folder with {FEATURES_TSV} "
                                f"and {PREDICTIONS_TSV}")
        self.feature_dim = 0
        self.notes = {"files": [FEATURES_TSV, PREDICTIONS_TSV]}
        self._fh = {}
        self._pred_at: dict[str, tuple[int, int]] = {}

    def signature(self) -> list:
        return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in (self.tsv, self.pred)]

    @staticmethod
    def _scan(path: Path) -> list[tuple[str, int, int]]:
        """(id, offset, length) of every non-empty line."""
        rows, offset = [], 0
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    rows.append((line.split(b"\t", 1)[0].decode("utf-8", "replace").strip(), offset, len(line)))
                offset += len(line)
        return rows

    def items(self):
        from .sources import SourceItem
        rows = self._scan(self.tsv)
        idx = lineidx_path(self.tsv)
        if idx.is_file():
            listed = [int(v) for v in idx.read_text().split()]
            if listed != [o for _, o, _ in rows]:
                raise PrepError(f"{idx}: its offsets do not match the rows of {self.tsv} (a stale "
                                ".lineidx?); delete it to import by scanning")
        self._pred_at = {sid: (o, n) for sid, o, n in self._scan(self.pred)}
        items = [SourceItem(sid, (o, n), "" if sid in self._pred_at else
                            f"{sid}: no row in {PREDICTIONS_TSV} (boxes and image size are there)")
                 for sid, o, n in rows]
        for item in items:
            if not item.error:
                try:
                    regions = self.read(item, item.source_id, probe=True)
                except ItemError:
                    continue
                self.feature_dim = regions.features.shape[1]
                break
        if not self.feature_dim:
            raise PrepError(f"{self.tsv}: no readable vinvl-tsv row (image_id, num_boxes, base64 features)")
        return items

    def _line(self, path: Path, offset: int, length: int) -> list[str]:
        fh = self._fh.get(path)
        if fh is None:
            fh = self._fh[path] = open(path, "rb")
        fh.seek(offset)
        return fh.read(length).decode("utf-8", "replace").rstrip("\r\n").split("\t")

    def read(self, item, key: str, probe: bool = False) -> Regions:
        from .sources import _b64_array, _int_field
        sid = item.source_id
        fields = self._line(self.tsv, *item.locator)
        if len(fields) < 3:
            raise ItemError(f"{sid}: {len(fields)} fields in {FEATURES_TSV}, need image_id, num_boxes, features")
        n = _int_field(fields[1], "num_boxes", sid)
        feats = _b64_array(fields[-1], np.float32, "features", sid)
        if n <= 0 or feats.size % n:
            raise ItemError(f"{sid}: num_boxes {n} does not divide the {feats.size} feature values")
        dim = feats.size // n
        if not probe and dim != self.feature_dim:
            raise ItemError(f"{sid}: {dim}-d features, the file's first row has {self.feature_dim}")
        try:
            pred = json.loads(self._line(self.pred, *self._pred_at[sid])[-1])
            objects = pred["objects"] if isinstance(pred, dict) else pred
            boxes = np.array([o["rect"] for o in objects], np.float32).reshape(-1, 4)
            conf = np.array([o.get("conf", np.nan) for o in objects], np.float32)
            width, height = (int(pred["image_w"]), int(pred["image_h"])) if isinstance(pred, dict) else (-1, -1)
        except (ValueError, KeyError, TypeError) as exc:
            raise ItemError(f"{sid}: unreadable {PREDICTIONS_TSV} row ({type(exc).__name__}: {exc})") from None
        if len(boxes) != n:
            raise ItemError(f"{sid}: {n} feature rows but {len(boxes)} objects in {PREDICTIONS_TSV}")
        return Regions(key, width, height, boxes, feats.reshape(n, dim), class_scores=conf)

    def close(self):
        for fh in self._fh.values():
            fh.close()
        self._fh = {}
