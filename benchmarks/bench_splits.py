"""Throughput of the whole build-splits stage on a generated COCO-sized Karpathy input.

    .venv/bin/python benchmarks/bench_splits.py [--images 120000 --per-image 5 --workdir DIR]

Writes a Karpathy dataset_coco.json (Karpathy's proportions: val and test 5,000 images each,
restval a quarter of the rest) and a stub features/ directory (one box of dimension 4 per image,
written through manifests.build.write_features: only the index matters to build-splits), then
times build_splits end to end (read, normalise, spaCy, WordPiece, parquet, manifest) and a no-op
re-run. Prints a table; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("man woman person child dog cat horse bus train car bike plane kitchen table street "
         "field beach wave surfboard pizza plate giraffe elephant bear umbrella kite phone "
         "standing sitting riding holding playing walking eating looking flying parked "
         "red white black large small two three several young old").split()
GLUE = ("a", "the", "on", "in", "of", "with", "next to", "near", "and", "at")
SYLLABLES = ("ba be bi bo bu ca ce co cu da de di do fa fe fi fo ga ge go ha he hi ho ja jo ka "
             "ke ki ko la le li lo lu ma me mi mo mu na ne ni no nu pa pe pi po ra re ri ro ru "
             "sa se si so su ta te ti to tu va ve vi vo wa we wi wo ya yo za ze zo").split()


class CaptionMaker:
    """COCO-like captions: 8-16 words, a Zipf-distributed vocabulary of ~25k word types (COCO has
    ~27k), first word capitalised, mixed final punctuation and stray spaces. The vocabulary size
    matters: build-splits tokenizes each distinct whitespace-separated chunk once."""

    def __init__(self, seed: int = 0, n_types: int = 25_000):
        self.rng = np.random.default_rng(seed)
        made = {"".join(self.rng.choice(SYLLABLES, self.rng.integers(2, 5)))
                for _ in range(n_types * 2)}
        self.vocab = np.array(WORDS + sorted(made)[:n_types - len(WORDS)])
        weights = 1.0 / np.arange(1, len(self.vocab) + 1) ** 1.05
        self.p = weights / weights.sum()

    def captions(self, n: int) -> list[str]:
        lengths = self.rng.integers(8, 17, n)
        words = iter(self.rng.choice(self.vocab, int(lengths.sum()), p=self.p).tolist())
        glue = iter(self.rng.choice(GLUE, int(lengths.sum())).tolist())
        ends = self.rng.choice([".", ".", "", " .", "!", ".  "], n).tolist()
        out = []
        for length, end in zip(lengths.tolist(), ends):
            text = " ".join(next(glue) if i % 3 == 0 else next(words) for i in range(length))
            out.append(text[0].upper() + text[1:] + end)
        return out


def write_inputs(root: Path, n_images: int, per_image: int, seed: int = 0) -> tuple[Path, Path]:
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions

    rng = random.Random(seed)
    texts = iter(CaptionMaker(seed).captions(n_images * per_image))
    n_eval = min(5000, n_images // 10)
    splits = ["val"] * n_eval + ["test"] * n_eval
    rest = n_images - len(splits)
    splits += ["restval"] * (rest // 4) + ["train"] * (rest - rest // 4)
    rng.shuffle(splits)
    images = []
    for i, split in enumerate(splits):
        folder = "val2014" if split in ("val", "test", "restval") else "train2014"
        images.append({"filepath": folder, "filename": f"COCO_{folder}_{i:012d}.jpg", "imgid": i,
                       "split": split, "cocoid": i,
                       "sentences": [{"raw": (raw := next(texts)),
                                      "tokens": raw.lower().split(), "imgid": i,
                                      "sentid": i * per_image + j} for j in range(per_image)]})
    captions = root / "dataset_coco.json"
    captions.write_text(json.dumps({"images": images, "dataset": "coco"}), "utf-8")
    keys = sorted(f"{im['filepath']}/{im['filename']}" for im in images)
    box, feature = np.array([[0, 0, 8, 8]], np.float32), np.zeros((1, 4), np.float32)
    write_features(root / "features", (Regions(k, 640, 480, box, feature) for k in keys),
                   feature_dim=4, shard_size=10000, columns=(), stage="bench-stub")
    return captions, root / "features"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120_000)
    parser.add_argument("--per-image", type=int, default=5)
    parser.add_argument("--workdir", type=Path, help="Keep the generated inputs here.")
    parser.add_argument("--per-caption", action="store_true",
                        help="Also time the fallback path (no chunk cache) for the ratio.")
    parser.add_argument("--reuse", action="store_true",
                        help="Reuse the inputs already generated in --workdir.")
    args = parser.parse_args()

    from teranprep.pipeline.splits import build_splits

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-splits-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.reuse and (root / "features" / "manifest.json").is_file():
            captions, features = root / "dataset_coco.json", root / "features"
        else:
            captions, features = write_inputs(root, args.images, args.per_image)
        setup_s = time.perf_counter() - t0
        for old in ("splits", "splits-per-caption"):
            shutil.rmtree(root / old, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        result = build_splits(captions, features=features, out=root / "splits")
        build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        again = build_splits(captions, features=features, out=root / "splits")
        noop_s = time.perf_counter() - t0
        assert again.noop
        m = result.manifest
        n = m["captions"]["rows"]
        print(f"input: {args.images} images, {n} captions, {captions.stat().st_size / 1e6:.0f} MB "
              f"Karpathy JSON (generated in {setup_s:.1f}s with the stub features)")
        print(f"{'run':<28}{'wall s':>9}{'captions/s':>13}{'CPU s':>9}")
        print(f"{'build-splits (cold)':<28}{build_s:>9.1f}{n / build_s:>13,.0f}{build_cpu:>9.1f}")
        print(f"{'  of which tokenize+write':<28}{m['timings']['tokenize_write_s']:>9.1f}"
              f"{m['captions']['kept'] / m['timings']['tokenize_write_s']:>13,.0f}")
        print(f"{'re-run (no-op)':<28}{noop_s:>9.1f}")
        if args.per_caption:
            from teranprep.tokenizers import captions as captions_module
            check = captions_module.CaptionTokenizer.check
            def no_cache(self, sample):
                self.chunk_cache = False
                return False
            captions_module.CaptionTokenizer.check = no_cache
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                slow = build_splits(captions, features=features, out=root / "splits-per-caption")
                slow_s, slow_cpu = time.perf_counter() - t0, time.process_time() - c0
            finally:
                captions_module.CaptionTokenizer.check = check
            assert slow.manifest["tokenizer"]["mode"] == "per-caption"
            same = all((root / "splits" / f).read_bytes() == (root / "splits-per-caption" / f).read_bytes()
                       for f in ("train.parquet", "val.parquet", "test.parquet"))
            print(f"{'per-caption path (fallback)':<28}{slow_s:>9.1f}{n / slow_s:>13,.0f}{slow_cpu:>9.1f}"
                  f"   chunk cache is {slow_s / build_s:.1f}x faster; parquet files identical: {same}")
        print(f"tokenizer mode: {m['tokenizer']['mode']}; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores (a shared machine inflates wall time, not CPU time)")
        print("counts:", {k: v["captions"] for k, v in m["counts"].items()},
              "dropped:", {k: v for k, v in m["dropped"].items() if v}, "truncated:", m["truncated"])
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS of this process: {peak_mb:,.0f} MB")
        print(f"target < 60 s: {'met' if build_s < 60 else 'MISSED'} ({build_s / 60:.2f} of the budget)")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
