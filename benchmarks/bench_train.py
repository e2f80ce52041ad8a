"""Benchmark: `prep train` steps/s at fp32 and bf16, and the share of each step spent waiting for data.

    python benchmarks/bench_train.py [--config teran_coco --steps 4 --images 400 --workers 0 ...]

Runs pipeline.train.train itself (the loop `prep train` runs) on generated data: --images
images of 36 x 2048 float16 regions in shards of 100 and 5 captions of 12-16 random word pieces
each. teran_coco's text encoder (bert-base-uncased) is built with random weights from a
bert-base-sized config (speed does not depend on the weights); other configs keep their own.
Steps/s comes from the step times train() logs in metrics.jsonl (log_every 1), the first step
(warm-up, worker start) left out; the data-wait share is waited / total over the same steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import torch

from teranprep.manifests.atomic import canonical_json
from teranprep.manifests.build import write_features
from teranprep.manifests.features import manifest_sha256
from teranprep.manifests.shards import Regions
from teranprep.manifests.splits import SPLITS_FORMAT, SPLITS_FORMAT_VERSION, relative_features_path
from teranprep.pipeline.train import train
from teranprep.teran.config import load_config


def make_data(root: Path, n_images: int, regions: int, dim: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((n_images + regions, dim)).astype(np.float16)
    xy = rng.uniform(0, 300, (regions, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 100], 1)
    keys = [f"img{i:06d}.jpg" for i in range(n_images)]
    write_features(root / "features", (Regions(k, 640, 480, boxes, pool[i:i + regions])
                                       for i, k in enumerate(keys)),
                   feature_dim=dim, dtype="float16", shard_size=100, columns=(), stage="bench")
    splits = root / "splits"
    splits.mkdir()
    caption_id = 0
    n_val = max(2, n_images // 10)
    for name, ks in (("train", keys[n_val:]), ("val", keys[:n_val]), ("test", keys[:n_val])):
        rows = []
        for k in ks:
            for _ in range(5):
                ids = [101] + rng.integers(1000, vocab, int(rng.integers(10, 15))).tolist() + [1012, 102]
                rows.append({"image_key": k, "caption_id": caption_id, "raw": "", "words": [],
                             "input_ids": np.asarray(ids, np.int32)})
                caption_id += 1
        pd.DataFrame(rows).to_parquet(splits / f"{name}.parquet", index=False)
    (splits / "manifest.json").write_bytes(canonical_json({
        "format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION,
        "features": {"path": relative_features_path(splits, root / "features"),
                     "manifest_sha256": manifest_sha256(root / "features")},
        "tokenizer": {"name": "bench", "vocab_sha256": "0" * 64}, "seed": 0, "counts": {}}))
    return splits


def bert_base_dir(directory: Path) -> Path:
    from transformers import BertConfig
    BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072).save_pretrained(directory)
    return directory


def run_once(splits: Path, config: dict, out: Path, steps: int, precision: str) -> dict:
    t0 = time.perf_counter()
    train(splits, config, out, stop_after=steps, precision=precision, device="cpu", echo=lambda *_: None)
    wall = time.perf_counter() - t0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["kind"] == "train" and r["step"] > 1]
    step_s = sum(r["step_s"] for r in timed) / len(timed)
    wait = sum(r["data_wait_share"] * r["step_s"] for r in timed) / sum(r["step_s"] for r in timed)
    shutil.rmtree(out)  # the checkpoint of a teran_coco-sized model is ~2 GB
    return {"steps_per_s": 1.0 / step_s, "step_s": step_s, "data_wait_share": wait, "wall_s": wall}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="teran_coco")
    p.add_argument("--batch-size", type=int, help="default: the config's (teran_coco: 40)")
    p.add_argument("--steps", type=int, default=4, help="steps per precision (the first is warm-up)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--workers", type=int, nargs="+", help="num_workers values to run (default: the config's)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--workdir", type=Path)
    a = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=a.workdir))
    try:
        config = load_config(a.config)
        if config["text"]["encoder"] == "bert-base-uncased":
            config["text"].update(encoder=str(bert_base_dir(work / "bert-base")), random_init=True)
        t = config["training"]
        t.update(log_every=1, val_every=10 ** 9, epochs=10 ** 3)
        if a.batch_size:
            t["batch_size"] = a.batch_size
        splits = make_data(work, a.images, 36, 2048, 30000)
        print(f"machine: {platform.machine()}, {psutil.cpu_count()} cpus, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {a.config} at batch {t['batch_size']}, 36 regions "
              f"x 2048 float16, {a.steps} steps each (first one not timed)")
        print(f"{'precision':>9} {'workers':>7} | {'steps/s':>8} {'s/step':>7} {'data wait':>9}")
        results = {}
        for workers in a.workers or [t["num_workers"]]:
            for precision in a.precisions:
                t["num_workers"] = workers
                r = run_once(splits, config, work / f"run-{precision}-{workers}", a.steps, precision)
                results[(precision, workers)] = r
                print(f"{precision:>9} {workers:>7} | {r['steps_per_s']:>8.3f} {r['step_s']:>7.2f} "
                      f"{100 * r['data_wait_share']:>8.1f}%", flush=True)
        for workers in a.workers or [t["num_workers"]]:
            if ("fp32", workers) in results and ("bf16", workers) in results:
                print(f"bf16 / fp32 steps/s, {workers} workers: "
                      f"{results[('bf16', workers)]['steps_per_s'] / results[('fp32', workers)]['steps_per_s']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
