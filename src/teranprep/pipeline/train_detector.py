"""train-detector: COCO boxes with classes and attributes -> a trained BUTD-family detector.

The model is the extractor's own (extractors/butd, e.g. the `butd-tiny` variant): training calls
its pieces (backbone, rpn_raw, proposals, box_features, box predictor) and computes the losses
in pipeline/detector_losses.py. Outputs in OUT:
    config.yaml        the resolved configuration
    last.pth           model + optimizer + epoch, rewritten after every epoch (resume point)
    classes.txt, attributes.txt   names, line i = the extractor's class_ids / attr_ids value i
    model_final.pth    the trained weights in the BUTD checkpoint layout extract-regions reads:
                       {"model": state dict, "config": ButdConfig overrides (class / attribute
                       counts, input size, anchors...), "classes", "attributes", ...}
    metrics.jsonl      one line per epoch: losses, validation mAP@0.5, attribute accuracy
Validation images: those whose COCO image entry has "split": "val"; without any, a fixed 10%.
Images with "split": "test" are never used.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import __version__
from ..errors import ItemError, PrepError
from ..settings import merge_settings
from ..manifests.atomic import atomic_write_bytes, commit_temp, temp_path_for
from ..manifests.fingerprint import fingerprint
from .detection_eval import ImageDetections, ImageTruth, mean_average_precision
from .detector_losses import (RoiSettings, RpnSettings, attr_logits_for_labels, roi_losses,
                              rpn_losses, sample_rois)

CHECKPOINT_FORMAT = "teranprep.butd-checkpoint"
CHECKPOINT_VERSION = 1
FINAL, LAST = "model_final.pth", "last.pth"

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


@dataclass
class TrainDetectorResult:
    out: Path
    epochs: int
    steps: int
    wall_s: float
    history: list[dict] = field(default_factory=list)
    noop: bool = False

    @property
    def weights(self) -> Path:
        return self.out / FINAL

    @property
    def final_map(self) -> float | None:
        return self.history[-1].get("val_map50") if self.history else None

    def summary(self) -> str:
        if not self.history:
            return f"train-detector: {self.out}: nothing trained"
        last = self.history[-1]
        head = "train-detector: up to date, nothing to do" if self.noop else \
            f"train-detector: {self.epochs} epochs, {self.steps} steps in {self.wall_s:.0f}s"
        attr = last.get("val_attr_accuracy")
        attr_text = f", attribute accuracy {attr:.3f}" if attr is not None else ""
        return (f"{head}\n  validation mAP@0.5 {last.get('val_map50', float('nan')):.3f}{attr_text} "
                f"on {last.get('val_images')} images\n  weights {self.weights} (use with "
                f"`prep extract-regions --model {last.get('model', 'butd-tiny')} --weights {self.weights}`)")


# ---------------------------------------------------------------- config and data

def load_detector_config(path: Path | None, overrides: dict | None = None) -> dict:
    cfg = DEFAULTS
    if path is not None:
        path = Path(path)
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


def _butd_config(cfg: dict, coco: CocoSet):
    from ..extractors.butd.config import ButdConfig, get_config
    from ..extractors.butd import VARIANTS
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
    from ..extractors.butd.config import VARIANTS
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
    from ..extractors.butd.ops import preprocess
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

    from ..extractors.butd.ops import clip_boxes, decode_boxes, preprocess
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


# ---------------------------------------------------------------- the stage

def _read_images(root: Path, samples: list[Sample], annotations: Path) -> tuple[list, list]:
    from .images import read_image
    images, kept = [], []
    missing = []
    for s in samples:
        try:
            image, _ = read_image(root / s.key)
        except ItemError as exc:
            missing.append(f"{s.key} ({exc})")
            continue
        images.append(image)
        kept.append(s)
    if missing and len(missing) > 0.01 * len(samples):
        raise PrepError(f"{root}: {len(missing)} of {len(samples)} images in {annotations} cannot be "
                        f"read (first: {missing[0]}); pass the folder the file_name paths are relative to")
    return images, kept


def _load_model(butd_cfg, cfg: dict):
    from ..extractors.butd.detector import init_random
    from ..extractors.butd.model import ButdModel
    model = ButdModel(butd_cfg)
    if cfg["init_weights"]:
        from ..extractors.checkpoints import read_butd_checkpoint
        sd, _, _, _ = read_butd_checkpoint(cfg["init_weights"])
        own = model.state_dict()
        # fine-tuning to other classes: heads whose shapes differ start fresh
        usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        init_random(model, cfg["seed"])
        model.load_state_dict(usable, strict=False)
    else:
        init_random(model, cfg["seed"])
    return model


def _optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise PrepError(f"detector config: optimizer must be sgd or adamw, not {cfg['optimizer']!r}")


def _lr_at(step: int, epoch: int, cfg: dict) -> float:
    lr = cfg["lr"] * cfg["lr_gamma"] ** sum(epoch >= e for e in cfg["lr_steps"])
    if cfg["warmup_iters"] and step < cfg["warmup_iters"]:
        lr *= (step + 1) / cfg["warmup_iters"]
    return lr


def _save(path: Path, payload: dict) -> None:
    tmp = temp_path_for(path)
    torch.save(payload, tmp)
    commit_temp(tmp, path)


def train_detector(annotations: Path, images: Path, *, config: Path | None = None, out: Path,
                   overrides: dict | None = None, overwrite: bool = False, echo=print) -> TrainDetectorResult:
    """Trains a detector (see _train_detector); the config's `threads` holds only for this call."""
    from ..threads import torch_threads
    with torch_threads(None):  # restores whatever _train_detector sets from the config
        return _train_detector(annotations, images, config=config, out=out, overrides=overrides,
                               overwrite=overwrite, echo=echo)


def _train_detector(annotations: Path, images: Path, *, config: Path | None, out: Path,
                    overrides: dict | None, overwrite: bool, echo) -> TrainDetectorResult:
    """Trains (or fine-tunes) a BUTD-family detector on COCO boxes; resumes from out/last.pth.

    A finished run with the same inputs and settings is a no-op. Prints validation mAP@0.5 after
    every epoch and writes model_final.pth in the BUTD checkpoint layout the extractor loads.
    """
    t0 = time.perf_counter()
    annotations, images, out = Path(annotations), Path(images), Path(out)
    cfg = load_detector_config(config, overrides)
    from ..manifests.ownership import DETECTOR_RUN, claim_output_dir
    claim_output_dir(out, DETECTOR_RUN)
    if not images.is_dir():
        raise PrepError(f"{images}: not a directory; pass the folder that holds the annotated images")
    coco = load_coco(annotations)
    butd_cfg, _ = _butd_config(cfg, coco)
    rpn = RpnSettings(**cfg["rpn"])
    roi = RoiSettings(**cfg["roi"])
    from ..manifests.atomic import sha256_file
    # `epochs` stays out: asking for more epochs continues the same run from last.pth
    params_fp = fingerprint({"config": {k: v for k, v in cfg.items() if k != "epochs"},
                             "annotations_sha256": sha256_file(annotations), "butd": asdict(butd_cfg)})
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    out.mkdir(parents=True, exist_ok=True)
    for name in (FINAL, LAST):
        path = out / name
        if path.is_file() and overwrite:
            path.unlink()
    history = _read_history(out)
    final = out / FINAL
    if final.is_file():
        stamp = _checkpoint_meta(final)
        if stamp.get("params_fingerprint") == params_fp and stamp.get("epoch") == cfg["epochs"]:
            return TrainDetectorResult(out, stamp.get("epoch", 0), stamp.get("step", 0),
                                       time.perf_counter() - t0, history, noop=True)
        if stamp.get("params_fingerprint") != params_fp:
            raise PrepError(f"{final}: was trained with other settings or data; use another --out or "
                        "pass --overwrite")
    (out / "config.yaml").write_text(yaml.safe_dump({**cfg, "resolved_model": checkpoint_config(butd_cfg)},
                                                    sort_keys=False), "utf-8")

    train_samples = [s for s in coco.samples if s.split not in ("val", "test")]
    val_samples = [s for s in coco.samples if s.split == "val"]
    if cfg["eval"]["max_images"]:
        val_samples = val_samples[:int(cfg["eval"]["max_images"])]
    train_images, train_samples = _read_images(images, train_samples, annotations)
    val_images, val_samples = _read_images(images, val_samples, annotations)
    if not train_samples:
        raise PrepError(f"{annotations}: no training images (all are val/test or unreadable)")
    echo(f"train-detector: {len(train_samples)} training / {len(val_samples)} validation images, "
         f"{len(coco.classes)} classes, {len(coco.attributes)} attributes, model {butd_cfg.name}")

    model = _load_model(butd_cfg, cfg)
    optimizer = _optimizer(model, cfg)
    start_epoch, step = 0, 0
    last = out / LAST
    if last.is_file():
        from ..extractors.weights import load_torch_file
        state = load_torch_file(last)
        if state.get("params_fingerprint") != params_fp:
            raise PrepError(f"{last}: was written with other settings or data; use another --out "
                            "or pass --overwrite")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        if start_epoch > cfg["epochs"]:
            raise PrepError(f"{last}: already trained for {start_epoch} epochs, more than the "
                            f"{cfg['epochs']} asked for; raise epochs or use another --out")
        history = [h for h in history if h["epoch"] <= start_epoch]
        echo(f"  resuming after epoch {start_epoch} (step {step}) from {last}")
    else:
        history = []

    batch = max(1, int(cfg["images_per_batch"]))
    steps_per_epoch = math.ceil(len(train_samples) / batch)
    labels = list(range(1, len(coco.classes) + 1))
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        t_epoch = time.perf_counter()
        # every epoch's order, flips and samples follow from (seed, epoch): resume repeats them
        rng = np.random.default_rng([cfg["seed"], epoch])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        order = rng.permutation(len(train_samples))
        sums: dict = {}
        for b in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, epoch, cfg)
            optimizer.zero_grad(set_to_none=True)
            chosen = order[b * batch:(b + 1) * batch]
            for i in chosen:
                s = train_samples[int(i)]
                image, boxes = train_images[int(i)], s.boxes
                if cfg["hflip"] and rng.random() < 0.5:
                    image, boxes = _hflip(image, boxes)
                losses = image_losses(model, image, boxes, s.labels, s.attrs, rpn, roi, generator)
                total = (losses["rpn_cls"] + losses["rpn_box"] + losses["roi_cls"] + losses["roi_box"]
                         + roi.attr_weight * losses["roi_attr"]) / len(chosen)
                total.backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                raise PrepError(f"train-detector: loss became non-finite at step {step}; lower lr in "
                                f"{config or 'the config'}")
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            step += 1
        record = {"epoch": epoch + 1, "step": step, "model": butd_cfg.name,
                  "train_s": round(time.perf_counter() - t_epoch, 1),
                  **{k: round(v / len(train_samples), 4) for k, v in sums.items()}}
        if val_samples:
            t_val = time.perf_counter()
            e = cfg["eval"]
            metrics = evaluate_detector(model, val_images, val_samples, labels, e["score_thresh"],
                                        e["nms"], e["max_per_image"])
            record.update(val_map50=round(metrics["map"], 4), val_images=len(val_samples),
                          val_attr_accuracy=None if metrics["attr_accuracy"] is None
                          else round(metrics["attr_accuracy"], 4),
                          val_ap50={coco.classes[k - 1]: round(v, 4) for k, v in metrics["per_class"].items()},
                          val_s=round(time.perf_counter() - t_val, 1))
        history.append(record)
        _save(last, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "epoch": epoch + 1, "step": step, "params_fingerprint": params_fp})
        _write_history(out, history)
        echo(_epoch_line(record, cfg["epochs"]))

    # label files for show-regions: line i names class id i (background excluded), as the
    # extractor's class_ids / attr_ids count them
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in coco.classes), "utf-8")
    (out / "attributes.txt").write_text("".join(f"{a}\n" for a in coco.attributes), "utf-8")
    _save(final, {"model": model.state_dict(), "config": checkpoint_config(butd_cfg),
                  "architecture": butd_cfg.name, "classes": coco.classes, "attributes": coco.attributes,
                  "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                  "teranprep_version": __version__, "params_fingerprint": params_fp,
                  "epoch": int(cfg["epochs"]), "step": step,
                  "val_map50": history[-1].get("val_map50") if history else None})
    return TrainDetectorResult(out, int(cfg["epochs"]), step, time.perf_counter() - t0, history)


def _epoch_line(r: dict, epochs: int) -> str:
    losses = " ".join(f"{k} {r[k]:.3f}" for k in ("rpn_cls", "rpn_box", "roi_cls", "roi_box", "roi_attr") if k in r)
    val = ""
    if "val_map50" in r:
        attr = r.get("val_attr_accuracy")
        val = f" | val mAP@0.5 {r['val_map50']:.3f}" + (f", attr acc {attr:.3f}" if attr is not None else "")
    return f"  epoch {r['epoch']}/{epochs} ({r['train_s']:.0f}s): {losses}{val}"


def _checkpoint_meta(path: Path) -> dict:
    from ..extractors.weights import load_torch_file
    state = load_torch_file(path)
    return {k: v for k, v in state.items() if k not in ("model", "optimizer")} if isinstance(state, dict) else {}


def _read_history(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def _write_history(out: Path, history: list[dict]) -> None:
    atomic_write_bytes(out / "metrics.jsonl",
                       "".join(json.dumps(h, sort_keys=True) + "\n" for h in history).encode("utf-8"))
