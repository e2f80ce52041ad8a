"""Writers of small community-format fixtures, written here from each format's published layout."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np


def make_records(ids, dim=8, boxes=(2, 5), seed=0):
    """{id: dict(width, height, boxes, features, class_ids, class_scores, attr_ids, attr_scores)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for sid in ids:
        n = int(rng.integers(boxes[0], boxes[1] + 1))
        xy = rng.uniform(0, 20, (n, 2)).astype(np.float32)  # boxes stay inside the >= 50 x 91 image
        out[sid] = {"width": int(rng.integers(50, 90)), "height": int(rng.integers(91, 130)),
                    "boxes": np.concatenate([xy, xy + rng.uniform(3, 30, (n, 2)).astype(np.float32)], 1),
                    "features": rng.standard_normal((n, dim)).astype(np.float32),
                    "class_ids": rng.integers(0, 1600, n).astype(np.int64),
                    "class_scores": rng.uniform(0, 1, n).astype(np.float32),
                    "attr_ids": rng.integers(0, 400, n).astype(np.int64),
                    "attr_scores": rng.uniform(0, 1, n).astype(np.float32)}
    return out


def b64(array, dtype):
    return base64.b64encode(np.asarray(array, dtype).tobytes()).decode()


def butd_row(sid, r):
    return "\t".join([sid, str(r["width"]), str(r["height"]), str(len(r["boxes"])),
                      b64(r["boxes"], "<f4"), b64(r["features"], "<f4")])


def lxmert_row(sid, r):
    return "\t".join([sid, str(r["height"]), str(r["width"]), b64(r["class_ids"], "<i8"),
                      b64(r["class_scores"], "<f4"), b64(r["attr_ids"], "<i8"),
                      b64(r["attr_scores"], "<f4"), str(len(r["boxes"])), b64(r["boxes"], "<f4"),
                      b64(r["features"], "<f4")])


def write_tsv(path: Path, lines):
    Path(path).write_text("".join(f"{line}\n" for line in lines))
    return Path(path)


def write_bua_npz(root: Path, records):
    root.mkdir(parents=True, exist_ok=True)
    for sid, r in records.items():
        info = {"image_id": sid, "image_h": r["height"], "image_w": r["width"],
                "num_boxes": len(r["boxes"]), "objects_id": r["class_ids"],
                "objects_conf": r["class_scores"], "attrs_id": r["attr_ids"],
                "attrs_conf": r["attr_scores"]}
        np.savez_compressed(root / f"{sid}.npz", x=r["features"], bbox=r["boxes"],
                            num_bbox=len(r["boxes"]), image_h=r["height"], image_w=r["width"],
                            info=info)
    return root


def write_teran(root: Path, records, sizes=False):
    (root / "bu_att").mkdir(parents=True, exist_ok=True)
    (root / "bu_box").mkdir(parents=True, exist_ok=True)
    for sid, r in records.items():
        np.savez_compressed(root / "bu_att" / f"{sid}.npz", feat=r["features"])
        np.save(root / "bu_box" / f"{sid}.npy", r["boxes"])
    if sizes:
        lines = ["id,width,height"] + [f"{s},{r['width']},{r['height']}" for s, r in records.items()]
        (root / "sizes.csv").write_text("\n".join(lines) + "\n")
    return root


def write_scan(root: Path, split, records, ids=True, extras=True):
    root.mkdir(parents=True, exist_ok=True)
    order = list(records)
    np.save(root / f"{split}_ims.npy", np.stack([records[s]["features"] for s in order]))
    if ids:
        (root / f"{split}_ids.txt").write_text("".join(f"{s}\n" for s in order))
    if extras:
        np.save(root / f"{split}_boxes.npy", np.stack([records[s]["boxes"] for s in order]))
        np.save(root / f"{split}_sizes.npy",
                np.array([[records[s]["width"], records[s]["height"]] for s in order], np.int32))
    return root


def write_splits(splits_dir, features, captions_of, repeat_ids=False):
    """A splits/ dir written through manifests.splits (what build-splits writes)."""
    from teranprep.manifests.features import manifest_sha256
    from teranprep.manifests.splits import relative_features_path, write_split, write_splits_manifest
    splits_dir.mkdir()
    cid = 0
    files = {}
    for name, images in captions_of.items():
        cid = 0 if repeat_ids else cid
        batch = {"image_key": [], "caption_id": [], "raw": [], "words": [], "input_ids": []}
        for key, caps in images.items():
            for cap in caps:
                batch["image_key"].append(key)
                batch["caption_id"].append(cid)
                batch["raw"].append(cap)
                batch["words"].append(cap.lower().split())
                batch["input_ids"].append([101, 7, 102])
                cid += 1
        files[f"{name}.parquet"] = write_split(splits_dir, name, [batch])
    write_splits_manifest(splits_dir, {
        "format": "teranprep.splits", "format_version": 1,
        "features": {"path": relative_features_path(splits_dir, features),
                     "manifest_sha256": manifest_sha256(features)},
        "counts": {n: {"captions": sum(len(c) for c in v.values()), "images": len(v)}
                   for n, v in captions_of.items()}, "files": files})
    return splits_dir
