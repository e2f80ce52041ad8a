"""index/: manifest.json + index.parquet + shards/ of region embeddings + the FAISS shortlist.

Layout (docs/FORMATS.md "index/"):
    index/manifest.json        format teranprep.index, written last, atomically
    index/index.parquet        the features/ index columns, one row per planned image
    index/shards/regions-*.h5  teranprep.regions shards whose `features` are the model's region
                               embeddings (alignment space, unit vectors, float16 by default)
    index/shortlist.faiss      one global vector per ok image; row i = the i-th ok key (key order)
    index/head.pt              the shortlist head that made those vectors (tensors only)
    index/captions.h5          optional: word embeddings of an indexed caption set (image->text)
Readers keep only the key table, the per-shard offsets and the FAISS index in memory; region
embeddings are read from the shards for the images asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..errors import PrepError
from .atomic import atomic_write_bytes, canonical_json, commit_temp, sha256_file, temp_path_for
from .features import (INDEX_NAME, MANIFEST_NAME, installed_version, shard_entries, status_counts,
                       write_index_parquet)

INDEX_FORMAT = "teranprep.index"
INDEX_FORMAT_VERSION = 1
SHORTLIST_NAME = "shortlist.faiss"
HEAD_NAME = "head.pt"
CAPTIONS_NAME = "captions.h5"
CAPTIONS_FORMAT = "teranprep.index-captions"


def read_index_manifest(index_dir: Path) -> dict:
    from .ownership import read_stamped_json
    return read_stamped_json(
        Path(index_dir) / MANIFEST_NAME, INDEX_FORMAT, what="index manifest",
        missing=f"no index manifest; build one with `prep index RUN --features F --out {index_dir}` "
                "(or let an interrupted one finish)",
        unreadable="re-run `prep index`", foreign="not a teranprep index",
        foreign_hint="pass a directory written by `prep index`")


def refuse_foreign_folder(out: Path, create: bool = True) -> None:
    """An index is never written into a folder another stage owns (nor inside one, nor a file)."""
    from .ownership import claim_output_dir
    claim_output_dir(out, INDEX_FORMAT, create=create)


def write_index_manifest(out: Path, *, rows: list[dict], shard_stats: list[dict], manifest: dict,
                         files: list[str]) -> dict:
    """index.parquet, then manifest.json (last, atomically). `files` (relative names of the
    shortlist, head, captions) get their size and sha256 recorded."""
    import time
    from .. import __version__

    import hashlib
    out = Path(out)
    frame, index_bytes = write_index_parquet(out, rows)
    full = {
        "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "stage": "index",
        "teranprep_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts": status_counts(frame),
        "index": {"path": INDEX_NAME, "sha256": hashlib.sha256(index_bytes).hexdigest()},
        "shards": shard_entries(shard_stats),
        "files": {name: {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
                  for name in files},
        "environment": {"torch": installed_version("torch"), "faiss": installed_version("faiss")},
        **manifest,
    }
    atomic_write_bytes(out / MANIFEST_NAME, canonical_json(full))
    return full


# ------------------------------------------------------------------ caption set (image -> text)

def write_captions(path: Path, *, words: list[np.ndarray], caption_ids: np.ndarray,
                   image_keys: list[str], raw: list[str], dtype: str) -> None:
    """Ragged word embeddings (the kept tokens' vectors, [CLS]..[SEP] included) + caption rows."""
    path = Path(path)
    tmp = temp_path_for(path)
    offsets = np.zeros(len(words) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(w) for w in words])
    dim = words[0].shape[1] if words else 0
    with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as h5:
        h5.attrs.update({"format": CAPTIONS_FORMAT, "format_version": 1, "embed_dim": dim})
        data = np.concatenate(words).astype(dtype) if words else np.zeros((0, dim), dtype)
        h5.create_dataset("words", data=data, track_times=False)
        h5.create_dataset("offsets", data=offsets, track_times=False)
        h5.create_dataset("caption_id", data=np.asarray(caption_ids, np.int64), track_times=False)
        string = h5py.string_dtype("utf-8")
        h5.create_dataset("image_key", data=np.array(image_keys, dtype=object), dtype=string,
                          track_times=False)
        h5.create_dataset("raw", data=np.array(raw, dtype=object), dtype=string, track_times=False)
    commit_temp(tmp, path)


def read_captions(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        if h5.attrs.get("format") != CAPTIONS_FORMAT:
            raise PrepError(f"{path}: not an index caption set; rebuild the index with --captions")
        return {"words": h5["words"][:], "offsets": h5["offsets"][:],
                "caption_id": h5["caption_id"][:],
                "image_key": [k.decode() if isinstance(k, bytes) else k for k in h5["image_key"][:]],
                "raw": [k.decode() if isinstance(k, bytes) else k for k in h5["raw"][:]]}


# ------------------------------------------------------------------ reader

class IndexStore:
    """Read-only view of an index/ directory: the key table in memory, region embeddings on disk.

    Row r of the shortlist is `keys[r]` (ok images in key order). `read_rows(rows)` reads only
    the asked images' rows, shard by shard, in storage order (one slice per image).
    """

    def __init__(self, index_dir: Path):
        from .remote import localize_folder
        self.root = localize_folder(index_dir, "index")  # an index at a URL: its cached copy
        self.manifest = read_index_manifest(self.root)
        path = self.root / INDEX_NAME
        try:
            table = pd.read_parquet(path, columns=["image_key", "status", "shard", "row", "width",
                                                   "height", "num_boxes"])
        except (OSError, ValueError) as exc:
            raise PrepError(f"{path}: unreadable index table ({exc}); run `prep verify {self.root}`") from exc
        ok = table[table["status"] == "ok"].sort_values("image_key", kind="stable")
        self.keys = ok["image_key"].to_numpy(dtype=object)
        self.shard_names = sorted(ok["shard"].unique().tolist())
        codes = {name: i for i, name in enumerate(self.shard_names)}
        self.shard_of = ok["shard"].map(codes).to_numpy(np.int32)
        self.row_in_shard = ok["row"].to_numpy(np.int32)
        self.sizes = ok[["width", "height"]].to_numpy(np.int32)
        self._position = None
        self._files: dict[int, h5py.File] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._datasets: dict[int, tuple] = {}
        self._chunks: dict[int, tuple | None] = {}
        self.embed_dim = int(self.manifest.get("embed_dim", 0))

    def __len__(self) -> int:
        return len(self.keys)

    def position(self, key: str) -> int:
        """The shortlist row of `key` (KeyError when it is not an ok image of the index)."""
        if self._position is None:  # built on first use: search never needs it
            self._position = {k: i for i, k in enumerate(self.keys)}
        return self._position[key]

    def _shard(self, code: int) -> tuple[h5py.File, np.ndarray]:
        h5 = self._files.get(code)
        if h5 is None:
            path = self.root / self.shard_names[code]
            try:
                h5 = self._files[code] = h5py.File(path, "r")
            except OSError as exc:
                raise PrepError(f"{path}: cannot open ({exc}); run `prep verify {self.root}`") from exc
            self._offsets[code] = h5["offsets"][:]
            self._datasets[code] = (h5["features"], h5["boxes"])  # a name lookup per read costs more than the read
        return h5, self._offsets[code]

    def read_rows(self, rows, *, boxes: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """[(embeddings (n, E) as stored, boxes (n, 4) or None)] for shortlist rows `rows`, in
        the order asked."""
        rows = np.asarray(rows, dtype=np.int64)
        out: list = [None] * len(rows)
        order = np.lexsort((self.row_in_shard[rows], self.shard_of[rows]))
        for i in order:
            code = int(self.shard_of[rows[i]])
            h5, offsets = self._shard(code)
            r = int(self.row_in_shard[rows[i]])
            lo, hi = int(offsets[r]), int(offsets[r + 1])
            features, box_ds = self._datasets[code]
            out[i] = (features[lo:hi], box_ds[lo:hi] if boxes else None)
        return out

    def _chunk_table(self, code: int):
        """(file descriptor, byte address of every 64-row chunk of `features`, rows per chunk) when
        the dataset is stored without filters, else None. A search reads the raw chunks with
        os.pread: h5py's per-slice cost (B-tree walk, selection setup; ~0.3-1 ms a call on a busy
        machine) is what dominated re-ranking."""
        if code in self._chunks:
            return self._chunks[code]
        features = self._datasets[code][0]
        table = None
        if features.chunks and features.compression is None and not features.shuffle \
                and not features.fletcher32 and features.chunks[1] == features.shape[1]:
            rows_per_chunk = features.chunks[0]
            n_chunks = -(-features.shape[0] // rows_per_chunk)
            address = np.full(n_chunks, -1, dtype=np.int64)
            for i in range(features.id.get_num_chunks()):
                info = features.id.get_chunk_info(i)
                address[info.chunk_offset[0] // rows_per_chunk] = info.byte_offset
            if (address >= 0).all():
                fd = os.open(self.root / self.shard_names[code], os.O_RDONLY)
                table = (fd, address, rows_per_chunk)
        self._chunks[code] = table
        return table

    def read_padded(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """The region sets of shortlist rows `rows` as one zero-padded float32 array (B, 1 + max n, E)
        with the unscored slot 0 empty, and the lengths (n + 1): the re-ranking read."""
        rows = np.asarray(rows, dtype=np.int64)
        spans = []
        for i in range(len(rows)):
            code = int(self.shard_of[rows[i]])
            _, offsets = self._shard(code)
            r = int(self.row_in_shard[rows[i]])
            spans.append((code, int(offsets[r]), int(offsets[r + 1])))
        lengths = np.array([hi - lo + 1 for _, lo, hi in spans], dtype=np.int64)
        width = max(int(lengths.max()) if len(rows) else 1, 2)
        out = np.zeros((len(rows), width, self.embed_dim), dtype=np.float32)
        for i in sorted(range(len(rows)), key=lambda j: spans[j]):
            code, lo, hi = spans[i]
            if hi <= lo:
                continue
            features = self._datasets[code][0]
            table = self._chunk_table(code)
            if table is None:
                out[i, 1:hi - lo + 1] = features[lo:hi]
                continue
            fd, address, per = table
            chunk_bytes = per * self.embed_dim * features.dtype.itemsize
            at = 1
            for c in range(lo // per, (hi - 1) // per + 1):
                block = np.frombuffer(os.pread(fd, chunk_bytes, int(address[c])), dtype=features.dtype)
                block = block.reshape(per, self.embed_dim)
                a, b = max(lo, c * per) - c * per, min(hi, (c + 1) * per) - c * per
                out[i, at:at + b - a] = block[a:b]
                at += b - a
        return out, lengths

    def read_shard_block(self, code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(every embedding of shard `code`, its offsets, the shortlist row of each of its images):
        the exhaustive scan reads a shard at once."""
        h5, offsets = self._shard(code)
        mine = np.flatnonzero(self.shard_of == code)
        positions = mine[np.argsort(self.row_in_shard[mine], kind="stable")]
        return h5["features"][:], offsets, positions

    def close(self) -> None:
        for table in self._chunks.values():
            if table is not None:
                os.close(table[0])
        self._chunks = {}
        for h5 in self._files.values():
            h5.close()
        self._files, self._offsets, self._datasets = {}, {}, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
