"""train-detector: COCO boxes with classes and attributes -> a trained BUTD-family detector.

The model is the extractor's own (extractors/butd, e.g. the `butd-tiny` variant): training calls
its pieces (backbone, rpn_raw, proposals, box_features, box predictor) through
extractors/butd/training/ (engine.py: the steps; losses.py; ap.py). This module owns the folder. Outputs in OUT:
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

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from .. import __version__
from ..errors import ItemError, PrepError
from ..manifests.atomic import atomic_write_bytes, commit_temp, temp_path_for
from ..manifests.fingerprint import fingerprint
from ..extractors.butd.training.engine import (Sample, build_model, butd_config, checkpoint_config,
                                               evaluate_detector, load_coco, load_detector_config,
                                               make_optimizer, train_epoch)
from ..extractors.butd.training.losses import RoiSettings, RpnSettings
from ..manifests.ownership import releases_locks

CHECKPOINT_FORMAT = "teranprep.butd-checkpoint"
CHECKPOINT_VERSION = 1
FINAL, LAST = "model_final.pth", "last.pth"


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


# ---------------------------------------------------------------- the stage

def _read_images(root: Path, samples: list[Sample], annotations: Path) -> tuple[list, list]:
    from .common.images import read_image
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


def _save(path: Path, payload: dict) -> None:
    tmp = temp_path_for(path)
    torch.save(payload, tmp)
    commit_temp(tmp, path)


@releases_locks
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
    butd_cfg, _ = butd_config(cfg, coco)
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

    model = build_model(butd_cfg, cfg)
    optimizer = make_optimizer(model, cfg)
    start_epoch, step = 0, 0
    last = out / LAST
    if last.is_file():
        from ..safe_torch import load_torch_file
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

    labels = list(range(1, len(coco.classes) + 1))
    for epoch in range(start_epoch, cfg["epochs"]):
        t_epoch = time.perf_counter()
        step, sums = train_epoch(model, optimizer, train_images, train_samples, cfg, rpn, roi, epoch,
                                 step, where=str(config or "the config"))
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
    from ..safe_torch import load_torch_file
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
