"""Given-box files (for extract-regions --given-boxes) and show-regions: boxes drawn on images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import PrepError


def read_given_boxes(path) -> dict[str, np.ndarray]:
    """image_key -> (k, 4) float32 x1,y1,x2,y2 pixels, from a JSON {key: [[x1,y1,x2,y2], ...]} or a
    parquet with columns image_key and boxes (a list of 4-lists, or a flat list of 4k numbers)."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: given-boxes file not found; pass a .json or .parquet file to --given-boxes")
    try:
        if path.suffix.lower() == ".parquet":
            import pandas as pd
            frame = pd.read_parquet(path)
            if not {"image_key", "boxes"} <= set(frame.columns):
                raise PrepError(f"{path}: needs columns image_key and boxes, has {list(frame.columns)}")
            raw = {}
            for key, boxes in zip(frame["image_key"], frame["boxes"]):
                seq = list(boxes) if boxes is not None else []
                if seq and not np.isscalar(seq[0]):
                    seq = [list(b) for b in seq]
                raw.setdefault(str(key), []).extend(np.asarray(seq, np.float64).reshape(-1, 4).tolist())
        else:
            raw = json.loads(path.read_text("utf-8"))
            if not isinstance(raw, dict):
                raise PrepError(f"{path}: expected a JSON object {{image_key: [[x1, y1, x2, y2], ...]}}")
    except PrepError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise PrepError(f"{path}: unreadable given-boxes file ({exc}); use JSON "
                        "{image_key: [[x1, y1, x2, y2], ...]} or parquet image_key + boxes") from exc
    out = {}
    for key, boxes in raw.items():
        try:
            arr = np.asarray(boxes, np.float32).reshape(-1, 4)
        except ValueError:
            raise PrepError(f"{path}: boxes of {key!r} are not a list of [x1, y1, x2, y2]") from None
        bad = ~np.isfinite(arr).all(1) | (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
        if bad.any():
            raise PrepError(f"{path}: {key!r} has {int(bad.sum())} invalid boxes (need finite x1 <= x2, "
                            f"y1 <= y2), first {arr[bad][0].tolist()}")
        out[str(key)] = arr
    return out


def read_labels(path) -> list[str] | None:
    """One name per line (e.g. Visual Genome objects_vocab.txt: line i = class id i, 0-based)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"{path}: labels file not found; pass a text file with one name per line")
    return [line.split(",")[0].strip() for line in path.read_text("utf-8").splitlines()]


def show_regions(features_dir, image_keys, out_dir, *, images_root=None, labels=None,
                 attr_labels=None, max_boxes: int | None = 36) -> list[Path]:
    """Draws each image's saved boxes with class (and attribute) names or ids; one PNG per key.

    The images are found under `images_root`, or the input root the features manifest records.
    """
    from PIL import Image, ImageDraw

    from ..manifests.features import FeatureStore
    from .common.images import read_image
    store = FeatureStore(Path(features_dir))
    root = Path(images_root) if images_root else Path(store.manifest.get("input", {}).get("root", ""))
    class_names, attr_names = read_labels(labels), read_labels(attr_labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with store:
        for key in image_keys:
            if key not in store:
                raise PrepError(unknown_key_message(store, key))
            regions = store[key]
            if not (root / key).is_file():
                raise PrepError(f"{root / key}: image not found; pass --images ROOT where {key} lives")
            image, _ = read_image(root / key)
            canvas = Image.fromarray(image)
            draw = ImageDraw.Draw(canvas)
            n = len(regions) if max_boxes is None else min(len(regions), max_boxes)
            for i in range(n):
                x1, y1, x2, y2 = (float(v) for v in regions.boxes[i])
                # VinVL keeps boxes up to 1 px inverted (maskrcnn_benchmark's x2 = ctr + w/2 - 1)
                x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
                color = tuple(int(c) for c in np.random.default_rng(i).integers(64, 256, 3))
                draw.rectangle([x1, y1, x2, y2], outline=color, width=2)
                text = _label(regions, i, class_names, attr_names)
                if text:
                    draw.text((x1 + 2, y1 + 1), text, fill=color)
            target = out_dir / png_name(key)
            canvas.save(target)
            written.append(target)
    return written


def png_name(key: str) -> str:
    """The PNG file name of an image key: `/` -> `__` (`train2014/x.jpg` -> `train2014__x.jpg.png`);
    a key that this would make ambiguous (it holds `__`, `%` or `_` next to `/`) is escaped first
    (`%` -> `%25`, `_` -> `%5F`), so two keys never share a file name."""
    if "__" in key or "%" in key or "_/" in key or "/_" in key:
        key = key.replace("%", "%25").replace("_", "%5F")
    return key.replace("/", "__") + ".png"


def unknown_key_message(store, key: str) -> str:
    """Why `key` has no regions in FeatureStore `store`: an error/skipped row, or not there at all."""
    rows = store.index[store.index["image_key"] == key]
    if len(rows):
        row = rows.iloc[0]
        return (f"{store.root}: {key!r} has no regions (status {row['status']}: "
                f"{row['error'] or 'no reason recorded'})")
    return (f"{store.root}: {key!r} is not in this features folder (its keys look like "
            f"{store.index['image_key'].iloc[0]!r} if any: paths relative to the image root)"
            if len(store.index) else f"{store.root}: {key!r} is not in this features folder (it is empty)")


def _label(regions, i, class_names, attr_names) -> str:
    def name(ids, names, prefix):
        if ids is None:
            return ""
        j = int(ids[i])
        if j < 0:  # VinVL: no attribute scored above its threshold
            return ""
        return names[j] if names and 0 <= j < len(names) else f"{prefix}{j}"

    cls = name(regions.class_ids, class_names, "c")
    attr = name(regions.attr_ids, attr_names, "a")
    score = f" {float(regions.class_scores[i]):.2f}" if regions.class_scores is not None else ""
    return " ".join(t for t in (attr, cls) if t) + score
