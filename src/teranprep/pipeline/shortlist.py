"""The train-shortlist stage: a run -> RUN/shortlist/ (head.pt + manifest.json), distilled from the
run's own alignment scores with ALADIN's ListNet loss, and its shortlist recall of TERAN's top-10.

TERAN stays frozen: its region and word vectors of the training split are encoded once, then
only the small head trains (seconds to minutes on a CPU). The folder is separate from the run's
checkpoints and has its own manifest (format teranprep.shortlist), as eval's folders do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import PrepError
from ..manifests.atomic import atomic_write_bytes, canonical_json, commit_temp, sha256_file, temp_path_for
from ..manifests.fingerprint import fingerprint
from ..manifests.ownership import releases_locks
from ..manifests.remote import beside_run, lineage_location, localize_folder, with_remote_folders

SHORTLIST_FORMAT = "teranprep.shortlist"
RECALL_SIZES = (10, 20, 50, 100, 500, 1000)  # the issue asks 50..1000; 10, 20 tell on small sets


@dataclass
class ShortlistResult:
    out: Path
    recall: dict      # {"trained": {N: fraction}, "untrained": ..., "mean": ...}
    eval_split: str
    n_eval_images: int
    noop: bool

    def summary(self) -> str:
        lines = [f"shortlist head {self.out}: share of exhaustive TERAN's top-10 kept by the "
                 f"shortlist of N ({self.eval_split} split, {self.n_eval_images} images)"]
        for name, rec in self.recall.items():
            lines.append(f"  {name:10s}" + "  ".join(f"N={n}: {100 * rec[n]:5.1f}%"
                                                  for n in sorted(rec, key=int)))
        return "\n".join(lines)


def _masks(model, encoded):
    from ..teran.alignment import region_keep_mask, word_keep_mask
    al = model.config["alignment"]
    return (region_keep_mask(encoded.region_lengths, encoded.regions.shape[1]),
            word_keep_mask(encoded.word_lengths, encoded.words.shape[1], al["drop_tokens"]))


@torch.no_grad()
def student_scores(head, model, encoded) -> np.ndarray:
    """(Ni, Nc) dot products of the head's global vectors."""
    rmask, wmask = _masks(model, encoded)
    gi = head.image_vectors(encoded.regions, rmask)
    gc = head.text_vectors(encoded.words, wmask)
    return (gi @ gc.T).numpy()


def recall_report(heads: dict, model, encoded, sizes=RECALL_SIZES, top: int = 10) -> dict:
    from ..teran.scoring import model_score_matrix
    from ..teran.shortlist import shortlist_recall
    exhaustive = model_score_matrix(model, encoded)
    return {name: shortlist_recall(exhaustive, student_scores(head, model, encoded), sizes, top)
            for name, head in heads.items()}


def distill(head, model, encoded, caption_image: np.ndarray, *, epochs: int, batch_size: int,
            lr: float, seed: int, echo=print) -> list[float]:
    """ListNet distillation of model's alignment scores into `head`, on in-batch image x caption
    matrices (one random caption of each image of the batch)."""
    from ..teran.alignment import alignment_scores
    from ..teran.shortlist import listnet_loss
    al = model.config["alignment"]
    rmask, wmask = _masks(model, encoded)
    captions_of = [np.flatnonzero(caption_image == i) for i in range(encoded.regions.shape[0])]
    images = np.array([i for i, c in enumerate(captions_of) if len(c)])
    if len(images) < 2:
        raise PrepError("train-shortlist: fewer than 2 training images with captions")
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    head.train()
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(images)
        total, steps = 0.0, 0
        for b0 in range(0, len(order) - 1, batch_size):
            batch = order[b0:b0 + batch_size]
            if len(batch) < 2:
                continue
            caps = np.array([rng.choice(captions_of[i]) for i in batch])
            with torch.no_grad():
                teacher = alignment_scores(encoded.regions[batch], rmask[batch], encoded.words[caps],
                                           wmask[caps], al["mode"], al["word_max_floor_zero"])
            gi = head.image_vectors(encoded.regions[batch], rmask[batch])
            gc = head.text_vectors(encoded.words[caps], wmask[caps])
            loss = listnet_loss(teacher, gi @ gc.T)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
        losses.append(total / max(steps, 1))
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            echo(f"  epoch {epoch + 1}/{epochs}: ListNet loss {losses[-1]:.4f}")
    head.eval()
    return losses


@with_remote_folders(inputs=("run", "splits"),
                     outputs={"out": lambda arguments: beside_run(arguments.get("run"), "shortlist")})
@releases_locks
def train_shortlist(run: Path, *, splits: Path | None = None, features: Path | None = None,
                    out: Path | None = None, dim: int = 256, hidden: int = 512, epochs: int = 30,
                    batch_size: int = 64, lr: float = 1e-3, max_images: int = 20000, seed: int = 0,
                    eval_split: str = "test", overwrite: bool = False, echo=print) -> ShortlistResult:
    from ..teran.data import load_split, open_features
    from ..teran.scoring import encode_split
    from ..teran.shortlist import ShortlistHead
    from ..teran.checkpoint import checkpoint_path, load_model

    for ok, message in [(dim >= 1, "--dim must be >= 1"), (epochs >= 1, "--epochs must be >= 1"),
                        (batch_size >= 2, "--batch-size must be >= 2"), (lr > 0, "--lr must be > 0"),
                        (max_images >= 2, "--max-images must be >= 2")]:
        if not ok:
            raise PrepError(message)
    ckpt_file = checkpoint_path(run)
    model, ckpt = load_model(ckpt_file, "cpu")
    if splits is None:
        trained_on = (ckpt.get("lineage") or {}).get("splits")
        if not trained_on:
            raise PrepError(f"{ckpt_file}: no training splits recorded; pass --splits")
        splits = localize_folder(trained_on, "splits")  # a path, or the URL of splits at one
    out = Path(out) if out is not None else (Path(run) if Path(run).is_dir() else ckpt_file.parent) / "shortlist"
    params = {"checkpoint_sha256": sha256_file(ckpt_file),
              "splits_manifest_sha256": sha256_file(Path(splits) / "manifest.json"),
              "dim": dim, "hidden": hidden, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "max_images": max_images, "seed": seed, "eval_split": eval_split,
              "loss": "listnet", "student_temperature": 6.0}
    params_fp = fingerprint(params)
    manifest_path = out / "manifest.json"
    from ..manifests.ownership import RUN, claim_output_dir
    claim_output_dir(out, SHORTLIST_FORMAT, allow_inside=(RUN,))
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text("utf-8"))
        except ValueError:
            existing = {}
        if existing.get("format") != SHORTLIST_FORMAT:
            raise PrepError(f"{manifest_path}: this folder belongs to another stage; pass another --out")
        if existing.get("parameters_fingerprint") == params_fp and (out / "head.pt").is_file():
            echo(f"train-shortlist: {out} is complete for these parameters, nothing to do")
            return ShortlistResult(out, existing["recall"], existing["eval"]["split"],
                                   existing["eval"]["n_images"], True)
        if not overwrite:
            raise PrepError(f"{out}: holds a head trained with other parameters; pass --overwrite or another --out")
    t0 = time.perf_counter()
    store = open_features(splits, features)
    max_regions = ckpt["config"]["training"].get("max_regions")
    train_data = load_split(splits, "train", store, max_images=max_images)
    echo(f"train-shortlist: encoding {len(train_data.image_keys)} training images and "
         f"{len(train_data.caption_image)} captions with the frozen model")
    encoded = encode_split(model, train_data, store, max_regions=max_regions)
    embed = int(ckpt["config"]["model"]["embed_dim"])
    torch.manual_seed(seed)
    head = ShortlistHead(embed, dim, hidden)
    torch.manual_seed(seed)
    untrained = ShortlistHead(embed, dim, hidden).eval()  # the same initialisation, never trained
    losses = distill(head, model, encoded, train_data.caption_image, epochs=epochs,
                     batch_size=batch_size, lr=lr, seed=seed, echo=echo)
    del encoded
    eval_data = load_split(splits, eval_split, store)
    eval_encoded = encode_split(model, eval_data, store, max_regions=max_regions)
    recall = recall_report({"trained": head, "untrained": untrained,
                            "mean": ShortlistHead(embed, kind="mean")}, model, eval_encoded)
    store.close()
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out / "head.pt")
    torch.save(head.payload(), tmp)
    commit_temp(tmp, out / "head.pt")
    manifest = {"format": SHORTLIST_FORMAT, "format_version": 1, "stage": "train-shortlist",
                "parameters": params, "parameters_fingerprint": params_fp,
                "head": {**head.describe(), "path": "head.pt", "sha256": sha256_file(out / "head.pt")},
                "lineage": {"checkpoint": lineage_location(ckpt_file), "checkpoint_sha256": params["checkpoint_sha256"],
                            "splits": lineage_location(splits),
                            "splits_manifest_sha256": params["splits_manifest_sha256"]},
                "losses": [round(v, 6) for v in losses],
                "recall": {name: {str(n): v for n, v in rec.items()} for name, rec in recall.items()},
                "recall_of": "share of each caption's exhaustive top-10 images inside the shortlist of N",
                "eval": {"split": eval_split, "n_images": len(eval_data.image_keys),
                         "n_captions": len(eval_data.caption_image)},
                "wall_s": round(time.perf_counter() - t0, 3)}
    atomic_write_bytes(manifest_path, canonical_json(manifest))
    return ShortlistResult(out, manifest["recall"], eval_split, len(eval_data.image_keys), False)
