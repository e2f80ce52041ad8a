"""Benchmark: does the two-stage search keep exhaustive TERAN's top-10 as the gallery grows?

    python benchmarks/bench_shortlist_scale.py [--sizes 1000,10000,100000] [--queries 400]
        [--train-images 1000] [--concepts 100] [--head-dim 256] [--head-epochs 30] [--head-batch 64]
        [--workdir DIR] [--reuse]

Planted-signal data in the style of tests/teran_fixtures.planted_dataset, made large: each image
has 3 regions, noisy copies (sigma 0.1) of 3 distinct concepts' 16-d prototypes (out of
--concepts), no two images the same concept triple; a caption names its image's concepts in a
random order. A tiny TERAN (the planted tests' shapes: 32-d joint space, 1-layer tiny BERT) is
trained on --train-images images of their own, then `train_shortlist` distils the ALADIN-style
head from it on those training images. The galleries are nested prefixes of a separate set of
images (1k in 10k in 100k), each indexed by `build_index` (the index stage: float16 region
embeddings, FAISS by the stage's own rule), and queried with captions of images of the 1k
prefix (so every query's own image is in every gallery).

Per gallery size:
  kept@N     share of each query's exhaustive top-10 (TERAN scores of every indexed image, from
             the index's own stored embeddings, ties broken by row as search does) that is
             inside the FAISS shortlist of N, for N = 50, 100, 200, 500
  wall p50   Searcher.search(ids=..., k=10, shortlist=N) per query, milliseconds (1 thread)
The load average is printed before and after each size: the machine may be shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np

CLS, SEP, DOT = 2, 3, 4
SHORTLISTS = (50, 100, 200, 500)


def planted(workdir: Path, n_concepts: int, n_train: int, n_gallery: int, sizes, seed: int = 0, per_image: int = 3):
    """features/ (train + gallery images) and splits/ (train; val/test: 500 gallery images for
    train-shortlist's own report; g<SIZE>: the first SIZE gallery images, one caption each)."""
    import pandas as pd
    from teranprep.manifests.atomic import canonical_json
    from teranprep.manifests.build import write_features
    from teranprep.manifests.features import manifest_sha256
    from teranprep.manifests.shards import Regions
    from teranprep.manifests.splits import SPLITS_FORMAT, SPLITS_FORMAT_VERSION, relative_features_path
    rng = np.random.default_rng(seed)
    dim = 16
    prototypes = rng.standard_normal((n_concepts, dim)).astype(np.float32)
    combos = np.array(list(itertools.combinations(range(n_concepts), per_image)), dtype=np.int32)
    if len(combos) < n_train + n_gallery:
        raise SystemExit(f"--concepts {n_concepts}: only {len(combos)} distinct triples")
    chosen = combos[rng.choice(len(combos), n_train + n_gallery, replace=False)]
    keys = [f"a{i:05d}.jpg" for i in range(n_train)] + [f"g{i:06d}.jpg" for i in range(n_gallery)]
    noise = 0.1 * rng.standard_normal((len(keys), per_image, dim)).astype(np.float32)
    xy = rng.uniform(0, 60, (len(keys), per_image, 2)).astype(np.float32)

    def items():
        for i, key in enumerate(keys):
            yield Regions(key, 100, 100, np.concatenate([xy[i], xy[i] + 30], 1),
                          prototypes[chosen[i]] + noise[i])

    features = workdir / "features"
    write_features(features, items(), feature_dim=dim, dtype="float32", shard_size=1000, columns=(),
                   stage="bench-planted")

    def caption(i):
        return [CLS] + [5 + int(c) for c in rng.permutation(chosen[i])] + [DOT, SEP]

    rows = {"train": [(keys[i], caption(i)) for i in range(n_train) for _ in range(2)]}
    rows["val"] = rows["test"] = [(keys[n_train + i], caption(n_train + i)) for i in range(500)]
    for size in sizes:
        rows[f"g{size}"] = [(keys[n_train + i], caption(n_train + i)) for i in range(size)]
    splits = workdir / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    cid = 0
    for name, rs in rows.items():
        records = []
        for key, ids in rs:
            records.append({"image_key": key, "caption_id": cid, "raw": " ".join(map(str, ids)),
                            "words": [str(i) for i in ids[1:-1]], "input_ids": np.asarray(ids, np.int32)})
            cid += 1
        pd.DataFrame(records).to_parquet(splits / f"{name}.parquet", index=False)
    manifest = {"format": SPLITS_FORMAT, "format_version": SPLITS_FORMAT_VERSION,
                "features": {"path": relative_features_path(splits, features),
                             "manifest_sha256": manifest_sha256(features)},
                "tokenizer": {"name": "tiny-test", "vocab_sha256": "0" * 64}, "seed": seed,
                "counts": {k: len(v) for k, v in rows.items()}}
    (splits / "manifest.json").write_bytes(canonical_json(manifest))
    return features, splits


def train_teran(workdir: Path, splits: Path, n_concepts: int, epochs: int, batch_size: int, lr: float) -> Path:
    import torch
    from transformers import BertConfig, BertModel
    from teranprep.pipeline.train import train
    torch.manual_seed(0)
    bert = workdir / "bert"
    BertModel(BertConfig(vocab_size=5 + n_concepts, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(bert)
    config = {
        "model": {"embed_dim": 32, "joint_layers": 1, "joint_heads": 2, "joint_ffn": 64, "dropout": 0.0},
        "image": {"hidden_dim": 32, "layers": 1, "heads": 2, "ffn": 64, "dropout": 0.0},
        "text": {"encoder": str(bert), "layers": 1},
        "alignment": {"mode": "MrSw"},
        "training": {"batch_size": batch_size, "epochs": epochs, "lr": lr, "lr_decay_epochs": 100, "lr_decay": 0.5,
                     "warmup_iters": 20, "val_every": 100000, "log_every": 50, "val_max_images": 500,
                     "seed": 7, "num_workers": 0},
    }
    run = workdir / "run"
    train(splits, config, run, echo=lambda *_: None)
    return run


def gallery_figures(index: Path, queries: list[list[int]], timed: int) -> dict:
    import torch
    from teranprep.pipeline.search import Searcher, pad_regions
    from teranprep.teran.scoring import score_matrix
    with Searcher(index) as s:
        n = len(s.store)
        # every indexed image's stored region embeddings, in shortlist row order
        regions_all = [None] * n
        for code in range(len(s.store.shard_names)):
            flat, offsets, positions = s.store.read_shard_block(code)
            for j, row in enumerate(positions):
                regions_all[row] = flat[offsets[j]:offsets[j + 1]]
        regions, rlens = pad_regions(regions_all, s.embed_dim)
        encoded = [s.encode_query(ids) for ids in queries]
        width = max(w.shape[1] for w, _ in encoded)
        words = torch.zeros(len(queries), width, s.embed_dim)
        for i, (w, _) in enumerate(encoded):
            words[i, :w.shape[1]] = w[0]
        lengths = torch.cat([l for _, l in encoded])
        al = s.alignment
        exact = score_matrix(regions, rlens, words, lengths, mode=al["mode"], drop_tokens=al["drop_tokens"],
                             word_max_floor_zero=al["word_max_floor_zero"], image_block=1000)  # (n, Q)
        top10 = np.argsort(-exact, axis=0, kind="stable")[:10]  # stable: ties by row, as search
        qvec = np.concatenate([s.query_vector(w, l) for w, l in encoded])
        _, found = s.faiss.search(qvec, min(max(SHORTLISTS), n))
        kept = {}
        for size in SHORTLISTS:
            got = [len(set(top10[:, q].tolist()) & set(found[q, :size].tolist())) / 10 for q in range(len(queries))]
            kept[size] = float(np.mean(got))
        # the search's own answer equals exhaustive's when the shortlist keeps the top-10
        walls = {}
        for size in SHORTLISTS:
            s.search(ids=queries[0], k=10, shortlist=size)  # warm
            times = [s.search(ids=q, k=10, shortlist=size).timings_ms["total"] for q in queries[:timed]]
            walls[size] = float(np.percentile(times, 50))
        ties = float(np.mean(exact[top10[9], np.arange(len(queries))] ==
                             exact[np.argsort(-exact, axis=0, kind="stable")[10], np.arange(len(queries))]))
        return {"images": n, "kept": kept, "wall_p50_ms": walls, "faiss": type(s.faiss).__name__,
                "tied_at_10": ties}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--timed", type=int, default=60, help="queries timed per size and N")
    p.add_argument("--train-images", type=int, default=1000)
    p.add_argument("--concepts", type=int, default=100)
    p.add_argument("--teran-epochs", type=int, default=6)
    p.add_argument("--teran-batch", type=int, default=16)
    p.add_argument("--teran-lr", type=float, default=3e-4)  # 1e-3 collapsed (all scores equal) with 100 concepts
    p.add_argument("--per-image", type=int, default=3, help="regions (concepts) per image")
    p.add_argument("--only-train", action="store_true", help="stop after training TERAN (to tune it)")
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--head-epochs", type=int, default=30)
    p.add_argument("--head-batch", type=int, default=64, help="train-shortlist --batch-size (in-batch negatives)")
    p.add_argument("--workdir", default="/tmp/bench_shortlist_scale")
    p.add_argument("--reuse", action="store_true", help="keep the data and the TERAN run of an earlier run")
    a = p.parse_args()
    import torch
    import faiss
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    from teranprep.pipeline.index import build_index
    from teranprep.pipeline.shortlist import train_shortlist
    from teranprep.extractors.precision import cpu_description
    sizes = [int(x) for x in a.sizes.split(",")]
    work = Path(a.workdir)
    if not a.reuse and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {platform.node()}, CPU {cpu_description()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"1 torch/FAISS thread; load average {os.getloadavg()[0]:.1f}", flush=True)
    t = time.perf_counter()
    if not (work / "splits" / "manifest.json").is_file():
        features, splits = planted(work, a.concepts, a.train_images, max(sizes), sizes, per_image=a.per_image)
    features, splits = work / "features", work / "splits"
    print(f"data: {a.train_images} training + {max(sizes)} gallery images, {a.concepts} concepts "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    run = work / "run"
    if not (run / "checkpoint_last.pt").exists():
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(work / "bert", ignore_errors=True)
        run = train_teran(work, splits, a.concepts, a.teran_epochs, a.teran_batch, a.teran_lr)
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    print(f"TERAN trained ({time.perf_counter() - t:.0f} s); its validation on 500 gallery images: "
          f"R@1 t2i {val[-1]['t2i']['r1']:.1f}, i2t {val[-1]['i2t']['r1']:.1f}" if val else "", flush=True)
    if a.only_train:
        return
    t = time.perf_counter()
    head = work / f"head-{a.head_dim}-{a.head_epochs}-{a.head_batch}"
    result = train_shortlist(run, splits=splits, out=head, dim=a.head_dim, epochs=a.head_epochs,
                             batch_size=a.head_batch, overwrite=True, echo=lambda *_: None)
    print(f"shortlist head trained ({time.perf_counter() - t:.0f} s); its own report on 500 gallery "
          f"images: " + json.dumps(result.recall["trained"]), flush=True)
    rng = np.random.default_rng(1)
    import pandas as pd
    frame = pd.read_parquet(splits / f"g{min(sizes)}.parquet")
    pick = rng.choice(len(frame), min(a.queries, len(frame)), replace=False)
    queries = [np.asarray(frame["input_ids"][i]).tolist() for i in pick]
    print("\n| gallery | FAISS | " + " | ".join(f"kept@{n}" for n in SHORTLISTS) + " | "
          + " | ".join(f"p50 ms N={n}" for n in SHORTLISTS) + " | top-10 tied at 10th | index s | load |")
    print("|---" * (4 + 2 * len(SHORTLISTS)) + "|")
    for size in sizes:
        t = time.perf_counter()
        index = work / f"index-{size}-{head.name}"
        build_index(run, features, index, splits=splits, split=f"g{size}", head=head, overwrite=True,
                    quiet=True, echo=lambda *_: None)
        built = time.perf_counter() - t
        load0 = os.getloadavg()[0]
        r = gallery_figures(index, queries, a.timed)
        print(f"| {size:,} | {r['faiss']} | " + " | ".join(f"{100 * r['kept'][n]:.1f}%" for n in SHORTLISTS)
              + " | " + " | ".join(f"{r['wall_p50_ms'][n]:.1f}" for n in SHORTLISTS)
              + f" | {100 * r['tied_at_10']:.0f}% | {built:.0f} | {load0:.1f}-{os.getloadavg()[0]:.1f} |", flush=True)
    print(f"# peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
