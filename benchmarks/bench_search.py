"""Benchmark: text-query latency of two-stage search (encode, FAISS shortlist, TERAN re-rank) at
10k / 100k / 1M indexed images, peak RSS, and the shortlist's recall on the demo's test set.

    python benchmarks/bench_search.py [--sizes 10000,100000,1000000] [--shortlist 200]
                                      [--store-images 10000] [--demo DIR]

Each size runs in its own child process (its peak RSS is its own ru_maxrss). The collection is
simulated with random unit vectors: a real index/ of --store-images images (real float16 HDF5
shards, 36 regions x 256-d, teran_small's joint space) whose key table is repeated to SIZE rows,
so image i's regions are read, for real, from row i mod --store-images; the shortlist is a real
FAISS index of SIZE random 256-d vectors chosen by the index stage's own rule (exact up to 100k,
IVF above). The text side is teran_small (MiniLM, 2 layers, random projections): encode time is
that of a real model. Timings are Searcher.search's own per-phase timings.
With --demo DIR (a finished `prep demo` output), the share of exhaustive TERAN's top-10 that the
shortlist of N keeps is measured on DIR/index (the demo's test images).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

QUERIES = ["a dog on a red couch", "two people riding bikes down a street", "a plate of food with broccoli",
           "a small white boat on the water", "a man holding a tennis racket", "a cat sleeping on a laptop",
           "a red bus parked next to a building", "a group of zebras in a field"]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_store(directory: Path, n_images: int, regions: int, dim: int) -> Path:
    """A real index/ of n_images random region sets (only the parts the searcher reads)."""
    from teranprep.manifests.build import write_shard
    from teranprep.manifests.index import write_index_manifest
    from teranprep.manifests.shards import Regions, shard_name
    if (directory / "manifest.json").is_file():
        return directory
    rng = np.random.default_rng(0)
    stats = []
    for s0 in range(0, n_images, 1000):
        items = []
        for i in range(s0, min(n_images, s0 + 1000)):
            emb = rng.standard_normal((regions, dim)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            xy = rng.uniform(0, 300, (regions, 2)).astype(np.float32)
            items.append(Regions(f"img{i:07d}.jpg", 640, 480, np.concatenate([xy, xy + 100], 1), emb))
        stats.append(write_shard(directory / "shards" / shard_name(len(stats)), items, feature_dim=dim,
                                 dtype="float16", attrs={"detector": "bench", "weights_sha256": ""}, columns=()))
    write_index_manifest(directory, rows=[r for s in stats for r in s["rows"]], shard_stats=stats,
                         manifest={"embed_dim": dim, "alignment": {"mode": "MrSw", "drop_tokens": "reference",
                                                                   "word_max_floor_zero": True}}, files=[])
    return directory


def one_size(a) -> dict:
    """Runs in the child: build the simulated collection, time the queries."""
    import faiss
    import torch
    from teranprep.manifests.index import IndexStore
    from teranprep.pipeline.index import faiss_plan
    from teranprep.pipeline.search import Searcher
    from teranprep.teran.config import PACKAGE_CONFIGS, load_config
    from teranprep.teran.model import build_model
    from teranprep.teran.shortlist import ShortlistHead

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    n, dim = a.one, a.dim
    base_rss = rss_mb()
    store = IndexStore(build_store(Path(a.workdir) / f"store-{a.store_images}", a.store_images, a.regions, dim))
    m = len(store)
    reps = int(np.ceil(n / m))  # the key table, SIZE rows, row i -> stored image i mod m
    store.keys = np.array([f"img{i:07d}.jpg" for i in range(n)], dtype=object)
    store.shard_of = np.tile(store.shard_of, reps)[:n]
    store.row_in_shard = np.tile(store.row_in_shard, reps)[:n]
    store.sizes = np.tile(store.sizes, (reps, 1))[:n]
    config = load_config(PACKAGE_CONFIGS / "teran_small.yaml")
    torch.manual_seed(0)
    model = build_model(config, 2048).eval()
    # The shortlist is built (and written) by another child, then read back as `prep search` and
    # `prep serve` do: the construction's temporary copies do not count in this process's peak.
    faiss_path = Path(a.workdir) / f"shortlist-{n}-{a.head_dim}.faiss"
    if not faiss_path.is_file():
        subprocess.run([sys.executable, __file__, "--build-faiss", str(n), f"--head-dim={a.head_dim}",
                        f"--workdir={a.workdir}", f"--threads={a.threads}"], check=True)
    index = faiss.read_index(str(faiss_path))
    if "nprobe" in faiss_plan(n):
        index.nprobe = faiss_plan(n)["nprobe"]
    plan = faiss_plan(n)
    build_s = json.loads(faiss_path.with_suffix(".json").read_text())["build_s"]
    searcher = Searcher.__new__(Searcher)  # the real search path over the simulated parts
    searcher.store, searcher.root, searcher.model, searcher.ckpt = store, store.root, model, {
        "text_config": model.text_encoder.config.to_dict()}
    searcher.device, searcher.faiss, searcher.warning = "cpu", index, None
    torch.manual_seed(0)
    searcher.head = ShortlistHead(dim, a.head_dim).eval()
    searcher.alignment = {"mode": "MrSw", "drop_tokens": "reference", "word_max_floor_zero": True}
    searcher.embed_dim, searcher._tokenizer_name, searcher._tokenizer, searcher._captions = dim, "minilm", None, None
    from teranprep.tokenizers.text import DEFAULT_CAPTION_RULE
    searcher.caption_rule = DEFAULT_CAPTION_RULE  # as Searcher.__init__ sets it from the index
    searcher.search(QUERIES[0], k=10, shortlist=a.shortlist)  # warm-up: tokenizer, page cache
    phases = {"encode": [], "shortlist": [], "rerank": [], "total": [], "cpu": []}
    for q in range(a.queries):
        c0 = time.process_time()
        result = searcher.search(QUERIES[q % len(QUERIES)] + f" number {q}", k=10, shortlist=a.shortlist)
        # CPU time of the query (1 thread): what the wall time would be on an idle core, which
        # a machine shared by several busy processes cannot show
        phases["cpu"].append((time.process_time() - c0) * 1e3)
        for key in ("encode", "shortlist", "rerank", "total"):
            phases[key].append(result.timings_ms[key])
    return {"images": n, "faiss": plan, "faiss_build_s": round(build_s, 1),
            "p50": {k: round(float(np.percentile(v, 50)), 2) for k, v in phases.items()},
            "p95": {k: round(float(np.percentile(v, 95)), 2) for k, v in phases.items()},
            "peak_rss_mb": round(rss_mb(), 0), "rss_before_mb": round(base_rss, 0)}


def build_shortlist_file(a) -> None:
    import faiss
    from teranprep.pipeline.index import build_faiss, faiss_plan, write_faiss
    faiss.omp_set_num_threads(a.threads)
    n = a.build_faiss
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    vectors = np.empty((n, a.head_dim), np.float32)
    for c0 in range(0, n, 100_000):
        block = rng.standard_normal((min(n, c0 + 100_000) - c0, a.head_dim)).astype(np.float32)
        vectors[c0:c0 + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    path = Path(a.workdir) / f"shortlist-{n}-{a.head_dim}.faiss"
    write_faiss(build_faiss(vectors, faiss_plan(n)), path)
    path.with_suffix(".json").write_text(json.dumps({"build_s": round(time.perf_counter() - t0, 1)}))


def demo_recall(demo: Path, index: Path | None = None, sizes=(10, 20, 50, 100, 500, 1000)) -> dict:
    """Share of exhaustive top-10 kept by the shortlist of N, over every test caption of the demo
    (index: DIR/index, the demo's own index of its test images, unless given)."""
    import pandas as pd
    from teranprep.pipeline.search import Searcher
    test = pd.read_parquet(demo / "splits" / "test.parquet")
    kept = {n: [] for n in sizes}
    with Searcher(index or demo / "index") as s:
        n_images = len(s.store)
        for ids in test["input_ids"]:
            words, lengths = s.encode_query(list(ids))
            exact = s.exhaustive_scores(words, lengths)
            top = set(np.argsort(-exact, kind="stable")[:10].tolist())
            _, found = s.faiss.search(s.query_vector(words, lengths), min(max(sizes), n_images))
            for n in sizes:
                kept[n].append(len(top & set(found[0][:n].tolist())) / len(top))
    return {"images": n_images, "captions": len(test), "head": s.store.manifest["shortlist"]["head"]["kind"],
            "kept": {n: round(float(np.mean(v)), 4) for n, v in kept.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--shortlist", type=int, default=200)
    p.add_argument("--queries", type=int, default=60)
    p.add_argument("--store-images", type=int, default=10000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/bench_search")
    p.add_argument("--demo", type=Path)
    p.add_argument("--demo-index", type=Path, help="Another index over the demo's images (default DIR/index).")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--build-faiss", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.build_faiss:
        build_shortlist_file(a)
        return
    if a.one:
        print(json.dumps(one_size(a)))
        return
    print(f"# {platform.machine()}, {platform.python_version()}, {time.strftime('%Y-%m-%d')}, "
          f"threads {a.threads}, shortlist N={a.shortlist}")
    print(f"# load average before: {os.getloadavg()[0]:.1f}")
    print("| images | shortlist index | p50 encode | p50 shortlist | p50 re-rank | p50 total | p95 total | p50 CPU | p95 CPU | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in [int(s) for s in a.sizes.split(",") if s]:
        args = [sys.executable, __file__, "--one", str(size), *[f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                                                            if k not in ("one", "demo", "demo_index", "sizes", "build_faiss") and v is not None]]
        out = subprocess.run(args, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        f = r["faiss"]
        kind = f["type"] + (f" nlist {f['nlist']} nprobe {f['nprobe']}" if "nlist" in f else "")
        print(f"| {size:,} | {kind} | {r['p50']['encode']} | {r['p50']['shortlist']} | {r['p50']['rerank']} | "
              f"{r['p50']['total']} | {r['p95']['total']} | {r['p50']['cpu']} | {r['p95']['cpu']} | {r['peak_rss_mb']:.0f} |")
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    if a.demo:
        print(json.dumps(demo_recall(a.demo, a.demo_index)))


if __name__ == "__main__":
    main()
