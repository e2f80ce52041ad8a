"""How the BUTD detector is trained: settings, COCO annotations, the per-image losses through the
model's pieces, one epoch of steps, and detection for measuring AP (pipeline/train_detector.py is
the stage that calls these and owns the output folder)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from ....errors import PrepError
from ....settings import merge_settings, resolve_config
from .ap import ImageDetections, ImageTruth, mean_average_precision
from .losses import (RoiSettings, RpnSettings, attr_logits_for_labels, roi_losses, rpn_losses,
                     sample_rois)

DEFAULTS = {
    "model": "butd-tiny",
    # ButdConfig fields to change (input size, anchors, proposal counts...); recorded in the
    # checkpoint so the extractor rebuilds the same network. Class / attribute counts come from
    # the annotation file.
    "model_overrides": {},
    "init_weights": None,  # a BUTD checkpoint to fine-tune from (heads resized as needed)
    "seed": 0,
    "epochs": 10,
    "images_per_batch": 2,
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "warmup_iters": 50,
    "lr_steps": [],  # epochs after which the rate is multiplied by lr_gamma
    "lr_gamma": 0.1,
    "grad_clip": 10.0,
    "hflip": True,
    "threads": None,
    "rpn": asdict(RpnSettings()),
    "roi": asdict(RoiSettings()),
    "eval": {"score_thresh": 0.05, "nms": 0.3, "max_per_image": 100, "max_images": None},
}


@dataclass
class Sample:
    key: str
    boxes: np.ndarray  # (m, 4) x1 y1 x2 y2, exclusive right/bottom, original pixels
    labels: np.ndarray  # (m,) 1..C
    attrs: np.ndarray  # (m,) 0 none, 1..A
    split: str


@dataclass
class CocoSet:
    classes: list[str]
    attributes: list[str]
    samples: list[Sample]


# ---------------------------------------------------------------- config and data

def load_detector_config(path: Path | None, overrides: dict | None = None) -> dict:
    cfg = DEFAULTS
    if path is not None:
        path = resolve_config(path, "detector")  # a YAML file or a bundled detector config's name
        try:
            data = yaml.safe_load(path.read_text("utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise PrepError(f"{path}: cannot read the detector config ({type(exc).__name__}); pass a YAML file "
                            "like configs/detector_tiny.yaml") from exc
        if not isinstance(data, dict):
            raise PrepError(f"{path}: expected a mapping of settings")
        cfg = merge_settings(cfg, data, str(path), opaque=("model_overrides",))
    return merge_settings(cfg, overrides or {}, "overrides", opaque=("model_overrides",))


def load_coco(path: Path) -> CocoSet:
    """Classes, attributes and per-image boxes of a COCO-format instances file (crowd boxes skipped).

    Attributes are read from each annotation's "attribute_ids" (a list; the first is used) and
    named by a top-level "attributes" list of {id, name}; both are optional.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise PrepError(f"{path}: not a readable COCO JSON ({exc}); pass an instances.json") from exc
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list)
                                            for k in ("images", "annotations", "categories")):
        raise PrepError(f"{path}: needs `images`, `annotations` and `categories` lists (COCO format)")
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i + 1 for i, c in enumerate(cats)}
    attrs = sorted(doc.get("attributes") or [], key=lambda a: a["id"])
    attr_index = {a["id"]: i + 1 for i, a in enumerate(attrs)}
    by_image: dict = {}
    for ann in doc["annotations"]:
        if ann.get("iscrowd"):
            continue
        if ann.get("category_id") not in cat_index:
            raise PrepError(f"{path}: annotation {ann.get('id')} has category_id "
                            f"{ann.get('category_id')!r}, not in `categories`")
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            continue
        ids = ann.get("attribute_ids") or []
        attr = attr_index.get(ids[0], 0) if ids else 0
        by_image.setdefault(ann["image_id"], []).append((x, y, x + w, y + h, cat_index[ann["category_id"]], attr))
    samples = []
    for im in doc["images"]:
        rows = by_image.get(im["id"], [])
        arr = np.asarray(rows, np.float32).reshape(-1, 6)
        samples.append(Sample(im["file_name"], arr[:, :4], arr[:, 4].astype(np.int64),
                              arr[:, 5].astype(np.int64), str(im.get("split", ""))))
    if not any(s.split == "val" for s in samples):
        # a fixed pseudo-random 10%, by file name, so it does not move when images are added
        for s in samples:
            if s.split != "test" and int(hashlib.sha256(s.key.encode()).hexdigest()[:8], 16) % 10 == 0:
                s.split = "val"
    return CocoSet([c["name"] for c in cats], [a["name"] for a in attrs], samples)


def butd_config(cfg: dict, coco: CocoSet):
    from ..config import ButdConfig, get_config
    from .. import VARIANTS
    if cfg["model"] not in VARIANTS:
        raise PrepError(f"detector config: model {cfg['model']!r} is not a BUTD variant; "
                        f"choose one of: {', '.join(sorted(VARIANTS))}")
    names = {f.name for f in fields(ButdConfig)}
    overrides = {}
    for key, value in (cfg["model_overrides"] or {}).items():
        if key not in names or key in ("name", "num_classes", "num_attrs"):
            raise PrepError(f"detector config: model_overrides.{key} is not a settable ButdConfig field")
        overrides[key] = tuple(value) if isinstance(value, list) else value
    overrides["num_classes"] = len(coco.classes) + 1
    overrides["num_attrs"] = len(coco.attributes) + 1 if coco.attributes else 0
    return get_config(cfg["model"], **overrides), overrides


def checkpoint_config(butd_cfg) -> dict:
    """Every ButdConfig field that differs from the named variant: what a loader must apply."""
    from ..config import VARIANTS
    base = VARIANTS[butd_cfg.name]
    out = {}
    for f in fields(butd_cfg):
        value = getattr(butd_cfg, f.name)
        if f.name != "name" and value != getattr(base, f.name):
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# ---------------------------------------------------------------- model pieces

def _to_model_boxes(boxes: np.ndarray, scale: float) -> torch.Tensor:
    """Exclusive original-pixel boxes -> the model's inclusive corners in resized pixels."""
    b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).clone()
    b[:, 2:] -= 1
    return b * scale


def _hflip(image: np.ndarray, boxes: np.ndarray):
    w = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def image_losses(model, image: np.ndarray, sample_boxes: np.ndarray, labels: np.ndarray,
                 attrs: np.ndarray, rpn: RpnSettings, roi: RoiSettings,
                 generator: torch.Generator) -> dict:
    """All five training losses for one image (RGB uint8), through the model's callable pieces."""
    from ..ops import preprocess
    cfg = model.cfg
    x, scale = preprocess(image, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
    gt = _to_model_boxes(sample_boxes, scale)
    res4 = model.backbone(x)
    raw = model.rpn_raw(res4)
    losses = rpn_losses(raw.objectness_logits, raw.anchor_deltas, raw.anchors, gt, rpn, generator)
    with torch.no_grad():
        detached = type(raw)(raw.objectness_logits.detach(), raw.anchor_deltas.detach(), raw.anchors)
        proposals, _ = model.proposals(detached, tuple(x.shape[-2:]), scale)
    sample = sample_rois(proposals, gt, torch.as_tensor(labels), torch.as_tensor(attrs), roi,
                         cfg.bbox_reg_weights, generator)
    features = model.box_features(res4, sample.boxes)
    predictor = model.roi_heads.box_predictor
    class_logits = predictor.cls_score(features)
    box_deltas = predictor.bbox_pred(features)
    attr_logits = attr_logits_for_labels(predictor, features, sample.labels) \
        if predictor.has_attributes else None
    losses.update(roi_losses(class_logits, box_deltas, attr_logits, sample, roi))
    return losses


@torch.no_grad()
def detect_objects(model, image: np.ndarray, score_thresh: float = 0.05, nms: float = 0.3,
                   max_per_image: int = 100) -> ImageDetections:
    """Standard Faster R-CNN inference (regressed boxes, per-class NMS), for measuring accuracy;
    extraction uses the BUTD box policy instead. Boxes come back exclusive, in original pixels."""
    from torchvision.ops import batched_nms

    from ..ops import clip_boxes, decode_boxes, preprocess
    cfg = model.cfg
    x, scale = preprocess(image, cfg.pixel_mean_bgr, cfg.test_short, cfg.test_max)
    h, w = x.shape[-2:]
    res4 = model.backbone(x)
    proposals, _ = model.proposals(model.rpn_raw(res4), (h, w), scale)
    head = model.head_outputs(res4, proposals)
    probs = torch.softmax(head.class_logits, dim=1)
    n, c = probs.shape
    boxes = decode_boxes(head.box_deltas, proposals, cfg.bbox_reg_weights, cfg.scale_clamp).view(n, c, 4)
    boxes = clip_boxes(boxes.reshape(-1, 4), h, w).view(n, c, 4)[:, 1:]
    scores, labels = probs[:, 1:], torch.arange(1, c).expand(n, c - 1)
    keep = scores > score_thresh
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    rows = keep.nonzero(as_tuple=True)[0]
    kept = batched_nms(boxes, scores, labels, nms)[:max_per_image]
    out_boxes = boxes[kept] / scale
    out_boxes[:, 2:] += 1.0  # inclusive -> exclusive right/bottom edges
    attrs = None
    if model.roi_heads.box_predictor.has_attributes:
        predictor = model.roi_heads.box_predictor
        attr_logits = attr_logits_for_labels(predictor, head.features[rows[kept]], labels[kept])
        attrs = attr_logits[:, 1:].argmax(dim=1).numpy() + 1
    return ImageDetections(out_boxes.numpy(), scores[kept].numpy(), labels[kept].numpy(), attrs)


def evaluate_detector(model, images: list[np.ndarray], samples: list[Sample], labels: list[int],
                      score_thresh=0.05, nms=0.3, max_per_image=100) -> dict:
    model.eval()
    dets = [detect_objects(model, im, score_thresh, nms, max_per_image) for im in images]
    truths = [ImageTruth(s.boxes, s.labels, s.attrs) for s in samples]
    return mean_average_precision(dets, truths, labels, 0.5)


# ---------------------------------------------------------------- training steps

def build_model(butd_cfg, cfg: dict):
    from ..detector import init_random
    from ..model import ButdModel
    model = ButdModel(butd_cfg)
    if cfg["init_weights"]:
        from ...checkpoints import read_butd_checkpoint
        sd, _, _, _ = read_butd_checkpoint(cfg["init_weights"])
        own = model.state_dict()
        # fine-tuning to other classes: heads whose shapes differ start fresh
        usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        init_random(model, cfg["seed"])
        model.load_state_dict(usable, strict=False)
    else:
        init_random(model, cfg["seed"])
    return model


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise PrepError(f"detector config: optimizer must be sgd or adamw, not {cfg['optimizer']!r}")


def lr_at(step: int, epoch: int, cfg: dict) -> float:
    lr = cfg["lr"] * cfg["lr_gamma"] ** sum(epoch >= e for e in cfg["lr_steps"])
    if cfg["warmup_iters"] and step < cfg["warmup_iters"]:
        lr *= (step + 1) / cfg["warmup_iters"]
    return lr




def train_epoch(model, optimizer, images: list[np.ndarray], samples: list[Sample], cfg: dict,
                rpn: RpnSettings, roi: RoiSettings, epoch: int, step: int, where: str = "the config"):
    """One epoch of SGD steps; returns (step after it, summed losses). The order, flips and
    samples follow from (seed, epoch) only, so a resumed run repeats them."""
    model.train()
    batch = max(1, int(cfg["images_per_batch"]))
    rng = np.random.default_rng([cfg["seed"], epoch])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    order = rng.permutation(len(samples))
    sums: dict = {}
    for b in range(math.ceil(len(samples) / batch)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, epoch, cfg)
        optimizer.zero_grad(set_to_none=True)
        chosen = order[b * batch:(b + 1) * batch]
        for i in chosen:
            s = samples[int(i)]
            image, boxes = images[int(i)], s.boxes
            if cfg["hflip"] and rng.random() < 0.5:
                image, boxes = _hflip(image, boxes)
            losses = image_losses(model, image, boxes, s.labels, s.attrs, rpn, roi, generator)
            total = (losses["rpn_cls"] + losses["rpn_box"] + losses["roi_cls"] + losses["roi_box"]
                     + roi.attr_weight * losses["roi_attr"]) / len(chosen)
            total.backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            raise PrepError(f"train-detector: loss became non-finite at step {step}; lower lr in {where}")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        step += 1
    return step, sums
