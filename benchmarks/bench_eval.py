"""Benchmark: scoring images x captions with TERAN's MrSw alignment, against the GEMM floor.

    python benchmarks/bench_eval.py [--images 1000 --captions 5000 --regions 36 --words 12 --dim 1024]
        [--precisions fp32 bf16]
    python benchmarks/bench_eval.py --coco5k [--score-blocks 1] [--encode-images 200] [--split-order]
        [--precisions fp32 bf16]
    python benchmarks/bench_eval.py --rankings [--repeats 3]

Random unit vectors stand in for encoded regions and words. The floor is the FLOPs of the
region-word similarities alone, 2*Ni*Nc*R*W*d, divided by the GEMM rate this machine reaches on a
block-shaped matrix product in that precision; the ratio says how close the blocked scoring is
to pure GEMM. Each precision runs in its own child process, one after the other (so each peak
is its own): peak memory is the child's peak RSS minus its RSS before the inputs were allocated.
bf16 inputs are held in bf16, as `prep eval --precision bf16` holds the encoded split.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from teranprep.teran.precision import compute_dtype
from teranprep.teran.scoring import padded_runs, score_matrix


def gemm_rate(m: int, k: int, n: int, repeats: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def unit(*shape, seed, dtype=torch.float32):
    """Random unit vectors along the last axis, made 256 rows at a time straight into `dtype`
    (so the bench's own temporaries do not add to the peak RSS it measures)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(*shape, dtype=dtype)
    for r0 in range(0, shape[0], 256):
        x = torch.randn(min(256, shape[0] - r0), *shape[1:], generator=g)
        out[r0:r0 + 256] = x / x.norm(dim=-1, keepdim=True)
    return out


def measure(a) -> dict:
    """One precision, in this process: time, GEMM floor and peak memory."""
    dtype = compute_dtype(a.child)
    rss0 = psutil.Process().memory_info().rss
    # Slot 0 (the global image vector) is part of every region set and never scored.
    regions = unit(a.images, a.regions + 1, a.dim, seed=0).to(dtype)
    words = unit(a.captions, a.words, a.dim, seed=1).to(dtype)
    region_lengths = torch.full((a.images,), a.regions + 1)
    word_lengths = torch.full((a.captions,), a.words)

    rate = gemm_rate(a.image_block * a.regions, a.dim, a.caption_block * a.words, dtype=dtype)
    t0 = time.perf_counter()
    scores = score_matrix(regions, region_lengths, words, word_lengths, mode="MrSw", drop_tokens="none",
                          image_block=a.image_block, caption_block=a.caption_block, precision=a.child)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert scores.shape == (a.images, a.captions)
    flops = 2.0 * a.images * a.captions * a.regions * a.words * a.dim
    return {"precision": a.child, "rate": rate, "floor": flops / rate, "time": elapsed,
            "peak_mb": (peak - rss0) / 2**20,
            "inputs_mb": (regions.numel() + words.numel()) * regions.element_size() / 2**20}


def coco_lengths(n: int, seed: int = 2) -> torch.Tensor:
    """Token counts of n COCO-like captions as TERAN's text side sees them ([CLS] .. [SEP]): an
    ASSUMED distribution, 10 + Poisson(3.5) (mean ~13.5) with 0.3% long captions of 25..50
    tokens, so a block's padded width is set by its longest caption as on real data."""
    g = torch.Generator().manual_seed(seed)
    lengths = 10 + torch.poisson(torch.full((n,), 3.5), generator=g).long()
    long = torch.rand(n, generator=g) < 0.003
    lengths[long] = torch.randint(25, 51, (int(long.sum()),), generator=g)
    return lengths


def write_coco_checkpoint(path: Path, workdir: Path) -> None:
    """A teran_coco checkpoint as `prep train` writes one (train.py's payload: the weights, Adam's
    two moments per weight, the config), with a random-weight bert-base text encoder: what eval
    loads, so the 5K figures include the model and its loading."""
    from bench_train import bert_base_dir  # benchmarks/ is this script's folder
    from teranprep.pipeline.train import CHECKPOINT_VERSION
    from teranprep.teran.checkpoint import CHECKPOINT_FORMAT
    from teranprep.teran.config import load_config
    from teranprep.teran.model import build_model
    config = load_config("teran_coco")
    config["text"].update(encoder=str(bert_base_dir(workdir / "bert-base")), random_init=True)
    torch.manual_seed(0)
    model = build_model(config, 2048)
    state = model.state_dict()
    moments = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
               for i, p in enumerate(model.parameters())}
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": state,
                "optimizer": {"state": moments, "param_groups": []}, "config": config,
                "feature_dim": 2048, "text_config": model.text_encoder.config.to_dict(),
                "lineage": None}, path)


def measure_encoding(a, precision: str, checkpoint: Path) -> tuple:
    """load_model(checkpoint), then eval's encoding (batches of 64 under the precision's autocast)
    of --encode-images images (36 regions + slot 0 x 2048) and 5x as many COCO-length captions,
    timed; the image side is released as eval releases it. -> (model, figures)."""
    from teranprep.teran.checkpoint import load_model
    from teranprep.teran.precision import autocast
    proc = psutil.Process()
    t0 = time.perf_counter()
    model, _meta = load_model(checkpoint)
    out = {"load_s": time.perf_counter() - t0, "after_load_rss_mb": proc.memory_info().rss / 2 ** 20}
    g = torch.Generator().manual_seed(5)
    n, r = a.encode_images, a.regions + 1
    t0 = time.perf_counter()
    with torch.no_grad():
        for b0 in range(0, n, 64):
            b = min(64, n - b0)
            features = torch.rand(b, r, 2048, generator=g)
            features[:, 0] = 0
            xy = torch.rand(b, r, 2, generator=g) * 400
            boxes = torch.cat([xy, xy + 100], dim=-1)
            with autocast("cpu", precision):
                model.encode_images(features, boxes, torch.tensor([[640.0, 480.0]] * b),
                                    torch.full((b,), r))
    out["encode_images_s"] = time.perf_counter() - t0
    model.release_image_side()
    lengths = coco_lengths(5 * n, seed=9).sort().values  # eval encodes captions by length
    t0 = time.perf_counter()
    with torch.no_grad():
        for b0 in range(0, len(lengths), 64):
            wl = lengths[b0:b0 + 64]
            ids = torch.randint(1000, 30000, (len(wl), int(wl.max())), generator=g)
            ids[torch.arange(ids.shape[1])[None, :] >= wl[:, None]] = 0
            with autocast("cpu", precision):
                model.encode_captions(ids, wl)
    out["encode_captions_s"] = time.perf_counter() - t0
    out["encode_s_all"] = (out["encode_images_s"] * a.images / n
                           + out["encode_captions_s"] * a.captions / (5 * n))
    out["model_mb_after_release"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    from teranprep.pipeline.common.distribute import return_free_memory
    return_free_memory()  # as eval does once its images are encoded and the image side dropped
    out["after_encoding_rss_mb"] = proc.memory_info().rss / 2 ** 20
    return model, out


def measure_coco5k(a) -> dict:
    """The 5K protocol's memory and time as `prep eval` spends them (with --encode-images, its
    checkpoint loading and encoding too, extrapolated from a sample): every image's
    regions held; captions in order of length, in chunks of at most CAPTION_ENCODE_BLOCKS x
    caption_block cut by padded_runs as eval cuts them, each padded to its own longest caption
    and scored against all images, then dropped; then the metrics, the saved
    top-k rankings and NDCG@25 over a captions x images float32 relevance file (the ROUGE-L cache's
    layout; its build is bench_relevance.py's). Scoring every block would take hours on 2 cores,
    so --score-blocks blocks are scored for real against the first --score-images images and
    timed, the rest are allocated like them and filled with random scores; the scoring time is
    extrapolated by images and caption tokens (the work per image and per token is the same)."""
    import numpy as np
    from teranprep.pipeline.evaluate import CAPTION_ENCODE_BLOCKS
    from teranprep.pipeline.relevance import NdcgScorer
    from teranprep.teran.metrics import retrieval_metrics, i2t_ranks, t2i_ranks, top_k_rows
    dtype = compute_dtype(a.child)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    model, encoding = (measure_encoding(a, a.child, Path(a.checkpoint)) if a.checkpoint
                       else (None, {}))  # the model stays held through the scoring, as in eval
    peaks = {}  # the process's peak RSS after each phase: which phase sets it

    def phase_done(name):
        peaks[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    phase_done("load + encoding")
    ni, nc = a.images, a.captions
    regions = unit(ni, a.regions + 1, a.dim, seed=0, dtype=dtype)
    region_lengths = torch.full((ni,), a.regions + 1)
    # eval takes the captions in chunks in order of length (which caption belongs to which image
    # does not change the work); the metrics below use caption_image as is
    lengths = coco_lengths(nc).sort().values
    caption_image = np.repeat(np.arange(ni), nc // ni)
    step = CAPTION_ENCODE_BLOCKS * a.caption_block
    scores = np.empty((ni, nc), dtype=np.float32)
    rng = np.random.default_rng(0)
    before_scoring_rss = proc.memory_info().rss  # the model's text side, the regions
    scored, score_s, blocks = 0, 0.0, 0
    score_split_s, worst_diff, scored_tokens = 0.0, 0.0, 0
    t_all = time.perf_counter()
    for c0, c1 in padded_runs(lengths.tolist(), step):  # eval's chunks
        wl = lengths[c0:c1]
        words = unit(len(wl), int(wl.max()), a.dim, seed=3 + c0, dtype=dtype)  # as encode_captions returns
        if a.score_blocks == 0 or blocks < a.score_blocks:
            k = a.score_images
            kwargs = dict(mode="MrSw", drop_tokens="none", image_block=a.image_block,
                          caption_block=a.caption_block, precision=a.child)
            # eval's way: the chunk in one call, its captions blocked by length (caption_blocks);
            # before: blocks in split order, i.e. one call per caption block with no padding
            # bound, so each block is as wide as its longest caption (same answers).
            t0 = time.perf_counter()
            got = score_matrix(regions[:k], region_lengths[:k], words, wl, **kwargs)
            score_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            before = got if not a.split_order else np.concatenate([
                score_matrix(regions[:k], region_lengths[:k], words[b0:b0 + a.caption_block],
                             wl[b0:b0 + a.caption_block], max_padding=float("inf"), **kwargs)
                for b0 in range(0, len(wl), a.caption_block)], axis=1)
            score_split_s += time.perf_counter() - t0
            worst_diff = max(worst_diff, float(np.abs(got - before).max()))
            scores[:k, c0:c0 + len(wl)] = got
            scores[k:, c0:c0 + len(wl)] = rng.standard_normal((ni - k, len(wl)), dtype=np.float32)
            scored += len(wl)
            scored_tokens += int(wl.sum())
        else:
            scores[:, c0:c0 + len(wl)] = rng.standard_normal((ni, len(wl)), dtype=np.float32)
        blocks += 1
        del words
    loop_s = time.perf_counter() - t_all
    regions_mb, element = regions.numel() * regions.element_size() / 2 ** 20, regions.element_size()
    model = regions = None  # eval drops both once the last block is scored
    phase_done("scoring")
    scoring_rss = proc.memory_info().rss
    # the relevance cache file: float32 captions x images, opened as eval opens it
    path = Path(a.workdir) / f"relevance-{nc}x{ni}.f32"
    if not path.is_file() or path.stat().st_size != 4 * nc * ni:
        with open(path, "wb") as f:
            for r0 in range(0, nc, 1000):
                f.write(rng.random((min(1000, nc - r0), ni), dtype=np.float32).tobytes())
    matrix = np.memmap(path, dtype=np.float32, mode="r", shape=(nc, ni))
    t0 = time.perf_counter()
    metrics = retrieval_metrics(scores, caption_image)
    ranks = (i2t_ranks(scores, caption_image), t2i_ranks(scores, caption_image))
    tops = (top_k_rows(scores, 10), top_k_rows(scores.T, 10))
    metrics_s = time.perf_counter() - t0
    phase_done("metrics + rankings")
    t0 = time.perf_counter()
    ndcg = NdcgScorer({"rougeL": matrix}, np.arange(nc), {}).fold(np.arange(ni), np.arange(nc), scores)
    ndcg_s = time.perf_counter() - t0
    phase_done("NDCG")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flops = 2.0 * ni * sum(int(l) for l in lengths) * a.regions * a.dim
    rate = gemm_rate(a.image_block * a.regions, a.dim, a.caption_block * 14, dtype=dtype)
    return {"precision": a.child, "scored_captions": scored, "score_s": score_s,
            # chunks differ in length now (sorted): extrapolated by tokens, not by captions
            "score_s_all": score_s * int(lengths.sum()) / max(scored_tokens, 1) * ni / a.score_images,
            # the old blocking's figures only when it ran (--split-order)
            "score_split_s": score_split_s if a.split_order else None,
            "score_split_s_all": (score_split_s * int(lengths.sum()) / max(scored_tokens, 1) * ni / a.score_images
                                  if a.split_order else None),
            "split_vs_length_max_abs_diff": worst_diff if a.split_order else None,
            "scored_floor_s": 2.0 * a.score_images * scored_tokens * a.regions * a.dim / rate,
            "score_images": a.score_images, "loop_s": loop_s,
            "metrics_s": metrics_s, "ndcg_s": ndcg_s, "rate": rate, "floor_s": flops / rate,
            "peak_rss_mb": peak / 2 ** 20, "start_rss_mb": rss0 / 2 ** 20,
            "before_scoring_rss_mb": before_scoring_rss / 2 ** 20,
            "after_scoring_rss_mb": scoring_rss / 2 ** 20,
            "regions_mb": regions_mb,
            "all_words_padded_mb": nc * int(lengths.max()) * a.dim * element / 2 ** 20,
            "max_len": int(lengths.max()), "mean_len": float(lengths.float().mean()),
            "encoding": encoding, "peak_rss_mb_after": peaks,
            "rsum": metrics["rsum"], "ndcg": ndcg, "n_ranks": int(len(ranks[0]) + len(ranks[1])),
            "top_shape": [list(t.shape) for t in tops]}


def measure_rankings(repeats: int) -> None:
    """The 5K protocol's sorting after scoring, on a random 5,000 x 25,000 float32 score matrix:
    eval's saved top-10 both ways and NDCG@25's top-25 both ways (its chunks), each by the full
    stable argsort cut at k (what eval did before) and by metrics.stable_top_k (what it does now),
    alternated `repeats` times in this one process; medians, and the answers compared."""
    import os
    import statistics
    import numpy as np
    from teranprep.extractors.precision import cpu_description
    from teranprep.teran.metrics import RANK_CHUNK, stable_top_k
    from teranprep.teran.relevance import NDCG_CHUNK_VALUES
    print(f"CPU {cpu_description()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load {os.getloadavg()[0]:.2f}")
    scores = np.random.default_rng(0).standard_normal((5000, 25000), dtype=np.float32)
    jobs = {"top-10 i2t (5,000 rows of 25,000)": (scores, 10, RANK_CHUNK),
            "top-10 t2i (25,000 rows of 5,000)": (scores.T, 10, RANK_CHUNK),
            "NDCG top-25 i2t": (scores, 25, NDCG_CHUNK_VALUES // 25000),
            "NDCG top-25 t2i": (scores.T, 25, NDCG_CHUNK_VALUES // 5000)}

    def argsort_way(m, k, chunk):
        return np.concatenate([np.argsort(-m[r:r + chunk], axis=1, kind="stable")[:, :k]
                               for r in range(0, m.shape[0], chunk)])

    def partition_way(m, k, chunk):
        return np.concatenate([stable_top_k(-m[r:r + chunk], k) for r in range(0, m.shape[0], chunk)])

    total = {"argsort": 0.0, "partition": 0.0}
    print("| step | full stable argsort s | partition top-k s | speed-up | same answer |")
    print("|---|---|---|---|---|")
    for name, (m, k, chunk) in jobs.items():
        times = {"argsort": [], "partition": []}
        answers = {}
        for _ in range(repeats):
            for way, fn in (("argsort", argsort_way), ("partition", partition_way)):
                t0 = time.perf_counter()
                answers[way] = fn(m, k, chunk)
                times[way].append(time.perf_counter() - t0)
        med = {w: statistics.median(t) for w, t in times.items()}
        for w in med:
            total[w] += med[w]
        same = np.array_equal(answers["argsort"], answers["partition"])
        print(f"| {name} | {med['argsort']:.2f} | {med['partition']:.2f} | "
              f"{med['argsort'] / med['partition']:.1f}x | {same} |")
    print(f"| all four | {total['argsort']:.2f} | {total['partition']:.2f} | "
          f"{total['argsort'] / total['partition']:.1f}x | |")
    print(f"load at the end {os.getloadavg()[0]:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=12)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--image-block", type=int, default=100)
    p.add_argument("--caption-block", type=int, default=500)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--coco5k", action="store_true",
                   help="the COCO 5K protocol's shape (5,000 x 25,000, COCO-like caption lengths): "
                        "eval's caption blocks, metrics, rankings and NDCG, time and peak RSS")
    p.add_argument("--score-blocks", type=int, default=1,
                   help="--coco5k: caption chunks (of 4 x --caption-block) scored for real; 0: all")
    p.add_argument("--score-images", type=int, default=500,
                   help="--coco5k: images the scored blocks are scored against (time x 5000 / this)")
    p.add_argument("--encode-images", type=int, default=0,
                   help="--coco5k: also load a teran_coco checkpoint (written once into --workdir) "
                        "and time eval's encoding of this many images and 5x as many captions "
                        "(time x 5000 / this); the model stays held through the scoring")
    p.add_argument("--split-order", action="store_true",
                   help="--coco5k: also time each scored chunk blocked as before caption_blocks "
                        "(split order, no padding bound); its wide blocks add to the peak RSS")
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/bench_eval")
    p.add_argument("--rankings", action="store_true",
                   help="time the 5K protocol's top-k sorts: full stable argsort vs partition top-k")
    p.add_argument("--repeats", type=int, default=3, help="--rankings: alternated repeats (median)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.rankings:
        measure_rankings(a.repeats)
        return
    if a.coco5k and not a.child:
        a.images, a.captions = 5000, 25000
    if a.child:
        print(json.dumps(measure_coco5k(a) if a.coco5k else measure(a)))
        return
    if a.coco5k:
        import os
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        from teranprep.extractors.precision import cpu_description
        print(f"CPU {cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        if a.encode_images:
            a.checkpoint = str(Path(a.workdir) / "teran_coco-checkpoint.pt")
            if not Path(a.checkpoint).is_file():
                write_coco_checkpoint(Path(a.checkpoint), Path(a.workdir))
            print(f"checkpoint {a.checkpoint}: {Path(a.checkpoint).stat().st_size / 2 ** 30:.2f} GiB", flush=True)
        for precision in a.precisions:
            load0 = os.getloadavg()[0]
            argv = [sys.executable, __file__, "--child", precision] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                if k not in ("precisions", "child", "coco5k", "rankings", "repeats", "split_order")
                and v is not None] + ["--coco5k"] + (["--split-order"] if a.split_order else [])
            done = subprocess.run(argv, check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(r))
            enc = r["encoding"]
            total = r["score_s_all"] + r["metrics_s"] + r["ndcg_s"] + enc.get("encode_s_all", 0.0)
            if enc:
                print(f"{precision}: load_model {enc['load_s']:.1f} s (RSS after {enc['after_load_rss_mb']:.0f} MB); "
                      f"encoding {enc['encode_images_s']:.1f} s for {a.encode_images} images + "
                      f"{enc['encode_captions_s']:.1f} s for {5 * a.encode_images} captions -> "
                      f"{enc['encode_s_all']:.0f} s for 5,000 + 25,000; text side held "
                      f"{enc['model_mb_after_release']:.0f} MB", flush=True)
            print(f"{precision}: 5,000 x 25,000 (caption tokens mean {r['mean_len']:.1f}, max {r['max_len']}): "
                  f"scoring {r['score_s']:.1f} s for {r['score_images']} images x {r['scored_captions']} captions -> "
                  f"{r['score_s_all']:.0f} s "
                  f"for all (GEMM floor {r['floor_s']:.0f} s at {r['rate'] / 1e9:.0f} GF/s; scored part "
                  f"{r['score_s'] / r['scored_floor_s']:.2f}x its floor); "
                  + (f"captions blocked in split order as before: {r['score_split_s']:.1f} s -> "
                     f"{r['score_split_s_all']:.0f} s ({r['score_split_s'] / r['score_s']:.2f}x; max |diff| "
                     f"{r['split_vs_length_max_abs_diff']:.1e}); " if a.split_order else "")
                  + f"metrics + "
                  f"rankings {r['metrics_s']:.1f} s; NDCG {r['ndcg_s']:.1f} s; total {total:.0f} s "
                  f"({total / 60:.1f} min) {'with' if enc else 'without'} encoding; peak RSS {r['peak_rss_mb']:.0f} MB "
                  f"(start {r['start_rss_mb']:.0f}); regions {r['regions_mb']:.0f} MB; all words padded "
                  f"at once would be {r['all_words_padded_mb']:.0f} MB; load {load0:.1f}-{os.getloadavg()[0]:.1f}",
                  flush=True)
        return
    rows = []
    for precision in a.precisions:
        argv = [sys.executable, __file__, "--child", precision] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
            if k not in ("precisions", "child", "rankings", "repeats")]
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'prec':>5} {'images':>7} {'captions':>8} {'R':>3} {'W':>3} {'d':>5} | {'GEMM GF/s':>9} "
          f"{'floor s':>8} {'time s':>8} {'ratio':>6} | {'peak MB':>8} {'inputs MB':>9}")
    for r in rows:
        print(f"{r['precision']:>5} {a.images:>7} {a.captions:>8} {a.regions:>3} {a.words:>3} {a.dim:>5} | "
              f"{r['rate'] / 1e9:>9.1f} {r['floor']:>8.2f} {r['time']:>8.2f} {r['time'] / r['floor']:>6.2f} | "
              f"{r['peak_mb']:>8.0f} {r['inputs_mb']:>9.0f}")
    times = {r["precision"]: r["time"] for r in rows}
    if "fp32" in times and "bf16" in times:
        print(f"bf16 speed-up over fp32 (same run): {times['fp32'] / times['bf16']:.2f}x")


if __name__ == "__main__":
    main()
