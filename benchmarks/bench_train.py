"""Benchmark: `prep train` steps/s at fp32 and bf16, and the share of each step spent waiting for data.

    python benchmarks/bench_train.py [--config teran_coco --steps 4 --images 400 --workers 0 ...]

Runs pipeline.train.train itself (the loop `prep train` runs) on generated data: --images
images of 36 x 2048 float16 regions in shards of 100 and 5 captions of 12-16 random word pieces
each. teran_coco's text encoder (bert-base-uncased) is built with random weights from a
bert-base-sized config (speed does not depend on the weights); other configs keep their own.
Steps/s comes from the step times train() logs in metrics.jsonl (log_every 1), the first step
(warm-up, worker start) left out (--warmup N: the first N); the data-wait share is waited /
total over the same steps. The first steps after DataLoader workers fork run slower for a while
(the parent's heap pages are shared with the workers copy-on-write until it writes each once:
measured 10.4, 6.9, 6.0, 5.9, 5.6 s against 6.6, 7.0, 5.8, 5.8, 5.7 s with no worker, 2026-12-08),
so --warmup 3 measures the steady state a long run spends its epochs in.

    python benchmarks/bench_train.py --reference /tmp/teran-orig [--steps 4 --threads 2 --profile --rounds 3]

With --reference PATH (a checkout of mesnico/TERAN, never part of this repository) the run also
times the STEP on one fixed batch, each variant in its own child process (so peak RSS, sampled
with psutil every 50 ms, is that variant's alone; with DataLoader workers also the tree's RSS,
which counts the pages they share with the parent once per process, and its proportional set
size, PSS, once a second, which does not), one child at a time:
  - teranprep step: build_model(teran_coco) + exactly the step of pipeline/train.py's loop
    (forward under the run's autocast, hinge_loss, backward, grad clip, optimizer, scheduler);
  - original step: mesnico/TERAN's TERAN(configs/teran_coco_MrSw.yaml) and train.py's step
    (scheduler.step(epoch), zero_grad, forward+loss, backward, clip_grad_norm_ 2.0, Adam with its
    two parameter groups). The original has no bf16 mode: its bf16 row wraps its forward+loss
    in torch.autocast("cpu", bfloat16), as teranprep's bf16 step does. Adapted at run time,
    nothing in PATH is edited: `nltk` (imported by models/teran.py for its stop-word option,
    off in teran_coco) is stubbed in sys.modules, and models.text.BertTokenizer (built in
    __init__ but never used by the forward pass; it would need a vocab file) is a stub.
    torch.cuda.is_available() is False here, so its .cuda() calls are never reached;
  - teranprep train(): the whole loop above (DataLoader included), for the data-wait share.
--rounds N runs those three N times per precision, interleaved, and prints each round's ratio
(its children ran back to back) and their median: this VM's speed drifts by 10-30% over minutes.
--malloc: teranprep's children run as `prep train` does on a CPU, keeping freed buffers for reuse
(pipeline.common.distribute.keep_freed_buffers), the original on glibc's defaults as its train.py
runs (ours, the default); every child on glibc's defaults (default); or every child keeping its
buffers, the original through MALLOC_MMAP_MAX_=0 / MALLOC_TRIM_THRESHOLD_ (all).
Both step variants get the same batch (train()'s first batch: same features, boxes normalised by
image size for the original, same word-piece ids and lengths), the same initial weights (the
teranprep model built from the config's seed, saved once and copied into the original through
reference_import's key map; BERT is a random-weight bert-base whose first 6 layers both use),
and the same torch thread count. A check child first runs both in eval mode (no dropout) in
fp32 and prints the two losses. The data wait of an isolated step is 0 by construction (the
batch is in memory before the step starts). Steps/s is over steps warmup+1..N in every variant.
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_once(splits: Path, config: dict, out: Path, steps: int, precision: str, warmup: int = 1) -> dict:
    t0 = time.perf_counter()
    train(splits, config, out, stop_after=steps, precision=precision, device="cpu", echo=lambda *_: None)
    wall = time.perf_counter() - t0
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["kind"] == "train" and r["step"] > warmup]
    step_s = sum(r["step_s"] for r in timed) / len(timed)
    wait = sum(r["data_wait_share"] * r["step_s"] for r in timed) / sum(r["step_s"] for r in timed)
    shutil.rmtree(out)  # the checkpoint of a teran_coco-sized model is ~2 GB
    return {"steps_per_s": 1.0 / step_s, "step_s": step_s, "data_wait_share": wait, "wall_s": wall}


# ---- --reference: teranprep's step, the original's step and train(), one child process each ----

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> float:
    return os.getloadavg()[0]


def first_batch(splits: Path, t: dict) -> dict:
    """The first batch train() itself trains on (same sampler, same seed, same collate)."""
    from teranprep.teran.data import EpochBatchSampler, PairDataset, load_split, make_loader, open_features
    store = open_features(splits)
    split = load_split(splits, "train", store)
    sampler = EpochBatchSampler(len(split.captions), t["batch_size"], t["seed"])
    sampler.set_position(0, 0)
    batch = next(iter(make_loader(PairDataset(split, store, t["max_regions"]), batch_sampler=sampler)))
    store.close()
    return batch


def reference_inputs(batch: dict) -> tuple:
    """teranprep's batch as the original's collate gives it: (images, captions, image lengths,
    caption lengths, boxes divided by the image's width/height)."""
    scale = batch["sizes"][:, [0, 1, 0, 1]][:, None, :]
    return (batch["features"].float(), batch["input_ids"], batch["region_lengths"].tolist(),
            batch["word_lengths"].tolist(), batch["boxes"] / scale)


def import_reference(path: Path):
    """mesnico/TERAN's TERAN class, adapted at run time (nothing under `path` is edited)."""
    import sys
    import types
    if "nltk" not in sys.modules:  # models/teran.py imports it for exclude-stopwords (off here)
        nltk = types.ModuleType("nltk")
        nltk.corpus = types.ModuleType("nltk.corpus")
        nltk.corpus.stopwords = nltk.corpus.words = None
        sys.modules.update({"nltk": nltk, "nltk.corpus": nltk.corpus})
    sys.path.insert(0, str(path))
    import models.text as text  # the checkout's models/ (a namespace package)

    class NoTokenizer:  # EncoderTextBERT builds one it never uses; it would need a vocab file
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return None

    text.BertTokenizer = NoTokenizer
    from models.teran import TERAN
    return TERAN


def build_reference(path: Path, bert_dir: Path, init: dict):
    """The original TERAN for teran_coco_MrSw.yaml, holding teranprep's initial weights."""
    import yaml
    from teranprep.teran.reference_import import map_reference_state_dict
    TERAN = import_reference(path)
    cfg = yaml.safe_load((path / "configs" / "teran_coco_MrSw.yaml").read_text())
    cfg["text-model"]["pretrain"] = str(bert_dir)
    model = TERAN(cfg)
    state = model.state_dict()
    ours_to_ref, _unused = map_reference_state_dict({k: k for k in state})
    missing = sorted(set(init) - set(ours_to_ref))
    if missing:
        raise SystemExit(f"original TERAN has no place for {missing[:3]}...")
    with torch.no_grad():
        for ours, ref in ours_to_ref.items():
            if ours in init:
                state[ref].copy_(init[ours])
    return model, cfg


class _Logger:  # the original's forward logs into model.logger (a LogCollector in train.py)
    def update(self, *args, **kwargs):
        pass


def _bf16(enabled: bool):
    import contextlib
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def child_main(a) -> None:
    """One variant in this process; its figures go to CHILD_WORK/result-KIND-PRECISION.json."""
    work, precision, kind = a.child_work, a.child_precision, a.child
    setup = json.loads((work / "setup.json").read_text())
    if a.threads:
        torch.set_num_threads(a.threads)
    config = setup["config"]
    t = config["training"]
    load0 = load_avg()
    result = {"kind": kind, "precision": precision, "threads": torch.get_num_threads()}
    if kind == "train":
        t["num_workers"] = setup["workers"]
        r = run_once(Path(setup["splits"]), config, work / f"run-{precision}", a.steps, precision, a.warmup)
        result.update(r)
    else:
        batch = torch.load(work / "batch.pt")
        init = torch.load(work / "init.pt", mmap=True)
        if kind == "check":
            result.update(check_losses(a, setup, batch, init))
        elif kind == "step":
            result.update(time_teranprep_step(config, batch, init, a.steps, precision, a.profile, a.warmup))
        elif kind == "reference":
            result.update(time_reference_step(a.reference, Path(setup["bert_dir"]), batch, init,
                                              a.steps, precision, a.profile, a.warmup))
    result["load_start"], result["load_end"] = load0, load_avg()
    import resource
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (work / f"result-{kind}-{precision}.json").write_text(json.dumps(result))


def check_losses(a, setup, batch, init) -> dict:
    """Both models at the same weights, eval mode (no dropout), fp32: the same loss?"""
    from teranprep.teran.alignment import hinge_loss
    from teranprep.teran.model import build_model
    config = setup["config"]
    ours = build_model(config, batch["features"].shape[-1])
    ours.load_state_dict(init)
    ours.eval()
    ref, cfg = build_reference(a.reference, Path(setup["bert_dir"]), init)
    ref.eval()
    ref.logger = _Logger()
    with torch.no_grad():
        loss_ours = float(hinge_loss(ours(batch).float(), config["training"]["margin"]))
        loss_ref = float(sum(ref(*reference_inputs(batch)).values()))
    return {"loss_teranprep": loss_ours, "loss_original": loss_ref}


def _summary(phases: list[dict], warmup: int = 1) -> dict:
    timed = phases[warmup:]
    mean = {k: sum(p[k] for p in timed) / len(timed) for k in timed[0]}
    return {"step_s": mean["total"], "steps_per_s": 1.0 / mean["total"], "phases": mean,
            "data_wait_share": 0.0, "all_steps": [p["total"] for p in phases]}


def _run_steps(one_step, steps: int, profile: bool, warmup: int = 1) -> dict:
    """`steps` timed calls of one_step() -> (phase times, loss); with `profile`, one more under
    torch.profiler, its top ops as a table."""
    phases, losses = [], []
    for _ in range(steps):
        times, loss = one_step()
        phases.append(times)
        losses.append(loss)
    out = {**_summary(phases, warmup), "losses": losses}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step()
        out["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return out


def time_teranprep_step(config: dict, batch: dict, init: dict, steps: int, precision: str,
                        profile: bool, warmup: int = 1) -> dict:
    """pipeline/train.py's step on a CPU (GradScaler disabled there, no torchrun), timed by phase."""
    from teranprep.pipeline.train import _all_finite, lr_factor, make_optimizer
    from teranprep.teran.alignment import hinge_loss
    from teranprep.teran.model import build_model
    from teranprep.teran.precision import autocast
    from teranprep.pipeline.common.distribute import keep_freed_buffers
    keep_freed_buffers()  # as train() does on a CPU (steps aside under --malloc default)
    t = config["training"]
    torch.manual_seed(t["seed"])
    model = build_model(config, batch["features"].shape[-1])
    model.load_state_dict(init)
    del init
    optimizer = make_optimizer(model, t, torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10 ** 6, t))
    model.train()

    def one_step():
        times = {}
        t0 = time.perf_counter()
        with autocast("cpu", precision):
            scores = model(batch)
        loss = hinge_loss(scores.float(), t["margin"])
        assert _all_finite(loss, False)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        float(loss.detach())
        t4 = time.perf_counter()
        times.update(forward=t1 - t0, backward=t2 - t1, clip=t3 - t2, optimizer=t4 - t3, total=t4 - t0)
        return times, float(loss.detach())

    return _run_steps(one_step, steps, profile, warmup)


def time_reference_step(path: Path, bert_dir: Path, batch: dict, init: dict, steps: int,
                        precision: str, profile: bool = False, warmup: int = 1) -> dict:
    """mesnico/TERAN train.py's step (its train() loop body, logging left out), timed by phase."""
    model, cfg = build_reference(path, bert_dir, init)
    del init
    tr = cfg["training"]
    params, multiplier = model.get_parameters()
    optimizer = torch.optim.Adam([{"params": params[0]},
                                  {"params": params[1], "lr": tr["lr"] * multiplier}], lr=tr["lr"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, tr["step-size"], gamma=tr["gamma"])
    model.logger = _Logger()
    inputs = reference_inputs(batch)
    import warnings

    def one_step():
        t0 = time.perf_counter()
        model.train()
        with warnings.catch_warnings():  # scheduler.step(epoch) is deprecated; train.py calls it
            warnings.simplefilter("ignore")
            scheduler.step(0)
        optimizer.zero_grad()
        with _bf16(precision == "bf16"):
            loss_dict = model(*inputs)
            loss = sum(loss for loss in loss_dict.values())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad.clip_grad_norm_(model.parameters(), tr["grad-clip"])
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        return (dict(forward=t1 - t0, backward=t2 - t1, clip=t3 - t2, optimizer=t4 - t3, total=t4 - t0),
                float(loss.detach()))

    return _run_steps(one_step, steps, profile, warmup)


def run_child(a, work: Path, kind: str, precision: str) -> dict:
    """Runs one variant in a child process, sampling its RSS (and its workers') with psutil."""
    import subprocess
    import sys
    cmd = [sys.executable, __file__, "--child", kind, "--child-work", str(work),
           "--child-precision", precision, "--steps", str(a.steps), "--warmup", str(a.warmup)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.reference:
        cmd += ["--reference", str(a.reference)]
    if a.profile:
        cmd += ["--profile"]
    env = dict(os.environ)
    if a.malloc == "default":  # train()'s keep_freed_buffers steps aside (any MALLOC_* would not
        env["TERANPREP_MALLOC"] = "default"  # be glibc's default: setting one fixes its thresholds)
    elif a.malloc == "all":  # every child, the original too, keeps its freed buffers
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2 ** 62))
    proc = subprocess.Popen(cmd, env=env)
    ps = psutil.Process(proc.pid)
    peak, peak_tree, peak_pss, loads, n = 0, 0, 0, [], 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
            children = ps.children(recursive=True)
            tree = rss + sum(c.memory_info().rss for c in children)
            # forked DataLoader workers share the parent's pages (RSS counts them in each):
            # proportional set size, once a second (reading smaps costs more than RSS)
            if children and n % 20 == 0:
                peak_pss = max(peak_pss, sum(q.memory_full_info().pss for q in [ps] + children))
        except psutil.Error:
            rss = tree = 0
        peak, peak_tree = max(peak, rss), max(peak_tree, tree)
        loads.append(load_avg())
        n += 1
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"child {kind} {precision} failed ({proc.returncode})")
    r = json.loads((work / f"result-{kind}-{precision}.json").read_text())
    r.update(peak_rss_mb=peak / 2 ** 20, peak_tree_rss_mb=peak_tree / 2 ** 20,
             peak_tree_pss_mb=peak_pss / 2 ** 20,
             load_min=min(loads, default=0.0), load_max=max(loads, default=0.0))
    return r


def reference_main(a) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=a.workdir))
    try:
        config = load_config(a.config)
        if config["text"]["encoder"] != "bert-base-uncased":
            raise SystemExit("--reference compares teran_coco-shaped runs (bert-base text encoder)")
        t = config["training"]
        t.update(log_every=1, val_every=10 ** 9, epochs=10 ** 3)
        if a.batch_size:
            t["batch_size"] = a.batch_size
        # Random bert-base weights on disk: the original can only from_pretrained a directory.
        from transformers import BertConfig, BertModel
        bert_dir = work / "bert-base"
        torch.manual_seed(1234)
        BertModel(BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                             num_attention_heads=12, intermediate_size=3072)).save_pretrained(bert_dir)
        config["text"].update(encoder=str(bert_dir), random_init=True)
        splits = make_data(work, a.images, 36, 2048, 30000)
        torch.save(first_batch(splits, t), work / "batch.pt")
        from teranprep.teran.model import build_model
        torch.manual_seed(t["seed"])  # as train() does before build_model: the same initial weights
        torch.save(build_model(config, 2048).state_dict(), work / "init.pt")
        workers = (a.workers or [t["num_workers"]])[0]
        (work / "setup.json").write_text(json.dumps({"config": config, "splits": str(splits),
                                                     "bert_dir": str(bert_dir), "workers": workers}))
        threads = a.threads or torch.get_num_threads()
        print(f"CPU: {cpu_model()}, {psutil.cpu_count()} cpus; torch {torch.__version__}, "
              f"{threads} threads; {a.config} at batch {t['batch_size']}, 36 regions x 2048; "
              f"{a.steps} steps per variant (first {a.warmup} not timed); malloc {a.malloc}; load average at start "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        check = run_child(a, work, "check", "fp32")
        print(f"same weights, same batch, eval mode, fp32: loss teranprep {check['loss_teranprep']:.6f}, "
              f"original {check['loss_original']:.6f}", flush=True)
        rows = []
        for precision in a.precisions:
            for round_ in range(1, a.rounds + 1):
                for kind in ("reference", "step", "train"):
                    r = run_child(a, work, kind, precision)
                    r["round"] = round_
                    rows.append(r)
                    ph = r.get("phases")
                    print(f"  {kind:>9} {precision} (round {round_}): {r['step_s']:.2f} s/step"
                          + (f" (fwd {ph['forward']:.2f}, bwd {ph['backward']:.2f}, clip {ph['clip']:.2f}, "
                             f"opt {ph['optimizer']:.2f})" if ph else "")
                          + f", load {r['load_min']:.1f}-{r['load_max']:.1f}", flush=True)
                    if r.get("profile"):
                        print(r["profile"], flush=True)
        names = {"reference": "original TERAN step", "step": "teranprep step",
                 "train": f"teranprep train() ({workers} workers)"}
        print(f"\n| round | implementation | precision | s/step | steps/s | data wait | peak RSS | load |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            tree = (f" ({r['peak_tree_rss_mb'] / 1024:.2f} with workers, PSS "
                    f"{r['peak_tree_pss_mb'] / 1024:.2f})"
                    if r["peak_tree_rss_mb"] > r["peak_rss_mb"] * 1.01 else "")
            print(f"| {r['round']} | {names[r['kind']]} | {r['precision']} | {r['step_s']:.2f} | "
                  f"{r['steps_per_s']:.3f} | {100 * r['data_wait_share']:.1f}% | "
                  f"{r['peak_rss_mb'] / 1024:.2f} GB{tree} | {r['load_min']:.1f}-{r['load_max']:.1f} |")
        # each round's ratio is taken between children run back to back (the VM's speed drifts
        # by 10-30% over minutes); with --rounds > 1 their median too
        by = {(r["kind"], r["precision"], r["round"]): r for r in rows}
        for precision in a.precisions:
            for kind in ("step", "train"):
                ratios = [by[(kind, precision, n)]["steps_per_s"] / by[("reference", precision, n)]["steps_per_s"]
                          for n in range(1, a.rounds + 1)
                          if (kind, precision, n) in by and ("reference", precision, n) in by]
                if ratios:
                    print(f"{names[kind]} / original, {precision}: "
                          + ", ".join(f"{x:.2f}x" for x in ratios) + " steps/s"
                          + (f" (median {float(np.median(ratios)):.2f}x)" if len(ratios) > 1 else ""))
        print(f"eval-mode fp32 loss on the batch: teranprep {check['loss_teranprep']:.6f}, original "
              f"{check['loss_original']:.6f}")
        print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", type=Path, help="a checkout of mesnico/TERAN: also time its "
                   "training step on the same batch (see the module docstring)")
    p.add_argument("--threads", type=int, help="torch threads in every timed process (default: "
                   "torch's default here)")
    p.add_argument("--rounds", type=int, default=1, help="with --reference: the original, the "
                   "step and train() run this many times per precision, interleaved; a ratio per "
                   "round (children back to back) and their median")
    p.add_argument("--malloc", choices=("ours", "default", "all"), default="ours",
                   help="with --reference: ours = teranprep's children keep freed buffers for reuse "
                        "(keep_freed_buffers, as prep train does on a CPU), the original runs on "
                        "glibc's defaults, as its train.py does; default = every child on glibc's "
                        "defaults; all = every child keeps them (the original too, through MALLOC_*)")
    p.add_argument("--profile", action="store_true", help="with --reference: one more step of "
                   "teranprep and of the original under torch.profiler per precision, top ops printed")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-precision", help=argparse.SUPPRESS)
    p.add_argument("--config", default="teran_coco")
    p.add_argument("--batch-size", type=int, help="default: the config's (teran_coco: 40)")
    p.add_argument("--steps", type=int, default=4, help="steps per precision (the first --warmup not timed)")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the timing in every variant "
                   "(3 for the steady state after DataLoader workers fork)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--workers", type=int, nargs="+", help="num_workers values to run (default: the config's)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--workdir", type=Path)
    a = p.parse_args()
    if a.steps <= a.warmup:
        p.error(f"--steps {a.steps} leaves no timed step after --warmup {a.warmup}")
    if a.child:
        return child_main(a)
    if a.reference:
        return reference_main(a)

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
              f"x 2048 float16, {a.steps} steps each (first {a.warmup} not timed)")
        print(f"{'precision':>9} {'workers':>7} | {'steps/s':>8} {'s/step':>7} {'data wait':>9}")
        results = {}
        for workers in a.workers or [t["num_workers"]]:
            for precision in a.precisions:
                t["num_workers"] = workers
                r = run_once(splits, config, work / f"run-{precision}-{workers}", a.steps, precision, a.warmup)
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
