"""TERAN's CPU dropout (teran.model.cpu_dropout) against torch's (bernoulli_), alone and in a step.

  per element   ns an element of one training-mode dropout, forward and backward, on a
                teran_coco activation (40 x 37 x 2048), torch's F.dropout vs cpu_dropout
  step          teranprep's teran_coco training step (bench_train.py's batch and model, random
                weights) in one process, alternating rounds of two steps with every Dropout
                module on torch's path and on cpu_dropout: the median step of each and their
                ratio, taken at the same load

Usage: python benchmarks/bench_dropout.py [--precisions fp32 bf16] [--rounds 3] [--threads N]
The first line names the CPU model, torch threads and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402  (its data, batch and model helpers, and cpu_model)


def per_element(precision: str, reps: int = 7) -> dict:
    from teranprep.teran.model import cpu_dropout
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    x = torch.randn(40, 37, 2048, dtype=dtype, requires_grad=True)
    g = torch.randn(40, 37, 2048, dtype=dtype)
    out = {}
    for name, fn in (("torch", lambda t: F.dropout(t, 0.1, True)), ("ours", lambda t: cpu_dropout(t, 0.1))):
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            fn(x).backward(g)
            times.append(time.perf_counter() - t0)
            x.grad = None
        out[name] = statistics.median(times[1:]) * 1e9 / x.numel()
    return out


def step_ab(precision: str, rounds: int) -> dict:
    from teranprep.pipeline.common.distribute import keep_freed_buffers
    from teranprep.pipeline.train import make_optimizer
    from teranprep.teran import model as M
    from teranprep.teran.alignment import hinge_loss
    from teranprep.teran.config import load_config
    from teranprep.teran.precision import autocast
    keep_freed_buffers()  # as prep train on a CPU
    work = Path(tempfile.mkdtemp(prefix="bench-dropout-"))
    config = load_config("teran_coco")
    config["text"].update(encoder=str(bt.bert_base_dir(work / "bert-base")), random_init=True)
    t = config["training"]
    batch = bt.first_batch(bt.make_data(work, 200, 36, 2048, 30000), t)
    torch.manual_seed(0)
    model = M.build_model(config, 2048)
    optimizer = make_optimizer(model, t, torch.device("cpu"))
    model.train()

    def step() -> float:
        t0 = time.perf_counter()
        with autocast("cpu", precision):
            scores = model(batch)
        loss = hinge_loss(scores.float(), t["margin"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    ours = M.Dropout.forward
    times = {"torch": [], "ours": []}
    try:
        step()
        for _ in range(rounds):
            for name, forward in (("torch", nn.Dropout.forward), ("ours", ours)):
                M.Dropout.forward = forward
                step()  # the first step after a switch is not timed
                times[name] += [step(), step()]
    finally:
        M.Dropout.forward = ours
        shutil.rmtree(work, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items()} | {"all": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"CPU: {bt.cpu_model()}, {os.cpu_count()} cpus; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}", flush=True)
    for precision in a.precisions:
        e = per_element(precision)
        print(f"{precision} per element (forward + backward, 40x37x2048): torch {e['torch']:.2f} ns, "
              f"cpu_dropout {e['ours']:.2f} ns ({e['torch'] / e['ours']:.2f}x)", flush=True)
    for precision in a.precisions:
        load0 = os.getloadavg()[0]
        r = step_ab(precision, a.rounds)
        print(f"{precision} teran_coco step, median of {2 * a.rounds}: torch dropout {r['torch']:.3f} s, "
              f"cpu_dropout {r['ours']:.3f} s ({r['torch'] / r['ours']:.2f}x); load "
              f"{load0:.1f}-{os.getloadavg()[0]:.1f}", flush=True)
        print("  steps: " + "; ".join(f"{k} " + " ".join(f"{s:.2f}" for s in v) for k, v in r["all"].items()),
              flush=True)


if __name__ == "__main__":
    main()
