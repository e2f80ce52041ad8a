"""Named published weights: URL, sha256, format, architecture, box policy; resolved in a local cache.

Nothing is downloaded: offline (or always, here) the user fetches the file and puts it at the
path the error names. A sha256 of None means the published digest is not known to us; the file is
then accepted and its digest recorded in the features manifest (weights_sha256) instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrepError
from ..manifests.atomic import sha256_file


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    url: str
    filename: str
    sha256: str | None
    format: str  # checkpoints.py format name
    architecture: str  # extractors MODELS name
    min_boxes: int
    max_boxes: int
    note: str = ""


_SHAREPOINT = "https://awma1-my.sharepoint.com/:u:/g/personal/yuz_l0_tn/"
_VINVL = "https://penzhanwu2.blob.core.windows.net/sgg/sgg_benchmark/vinvl_model_zoo/"
WEIGHTS = {e.name: e for e in [
    WeightsEntry("butd-vg-r101-k36", _SHAREPOINT + "EUKhQ3hSRv9JrrW64qpNLSIBGoOjEGCkF8zvgBP9gKax-w?download=1",
                 "bua-caffe-frcn-r101_with_attributes_fix36.pth", None, "milvlg", "butd-r101", 36, 36,
                 "MILVLG conversion of the Caffe fix36 model (36 boxes per image)"),
    WeightsEntry("butd-vg-r101-k10-100", _SHAREPOINT + "EaXvCC3WjtlLvvEfLr3oa8UBLA21tcLh4L8YLbYXl6jgjg?download=1",
                 "bua-caffe-frcn-r101_with_attributes.pth", None, "milvlg", "butd-r101", 10, 100,
                 "MILVLG conversion of the Caffe adaptive model (10..100 boxes)"),
    WeightsEntry("butd-vg-r101-caffe-attr", "https://nlp1.cs.unc.edu/models/faster_rcnn_from_caffe_attr.pkl",
                 "faster_rcnn_from_caffe_attr.pkl", None, "py-bua", "butd-r101", 10, 100,
                 "py-bottom-up-attention conversion of the Caffe model with attributes"),
    # Released with scene_graph_benchmark (its README, "VinVL" section); the label map
    # VG-SGG-dicts-vgoi6-clipped.json sits beside it (LABEL_MAPS). Digest not published.
    WeightsEntry("vinvl-vg-x152c4", _VINVL + "vinvl_vg_x152c4.pth", "vinvl_vg_x152c4.pth", None,
                 "maskrcnn-benchmark", "vinvl-x152c4", 10, 100,
                 "VinVL ResNeXt-152 C4, 1594 objects + 524 attributes (10..100 boxes)"),
]}
# label maps published beside named weights: weights name -> (URL, file name in the cache)
LABEL_MAPS = {"vinvl-vg-x152c4": (_VINVL + "VG-SGG-dicts-vgoi6-clipped.json", "VG-SGG-dicts-vgoi6-clipped.json")}


def cache_dir() -> Path:
    env = os.environ.get("TERANPREP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "teranprep" / "weights"


def get_entry(name: str) -> WeightsEntry:
    if name not in WEIGHTS:
        raise PrepError(f"unknown weights {name!r}; `prep weights list` shows: {', '.join(sorted(WEIGHTS))}")
    return WEIGHTS[name]


def weights_path(name: str) -> Path:
    return cache_dir() / get_entry(name).filename


def resolve_weights(name: str) -> Path:
    """The cached file of `name`, checked against its sha256 when known; PrepError otherwise."""
    entry = get_entry(name)
    path = weights_path(name)
    if not path.is_file():
        raise PrepError(f"{path}: weights {name} not in the cache; download {entry.url} and save it "
                        f"as {path} (or set TERANPREP_CACHE)")
    if entry.sha256 is not None:
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise PrepError(f"{path}: sha256 {actual} differs from the published {entry.sha256} for "
                            f"{name}; delete it and download {entry.url} again")
    return path
