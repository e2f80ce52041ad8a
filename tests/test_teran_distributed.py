"""torchrun with the gloo backend and 2 CPU processes: one DDP step equals averaging the two
ranks' gradients by hand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from teran_fixtures import make_tiny_bert, random_dataset, tiny_config, one_thread  # noqa: F401 (autouse)
from teranprep.pipeline.train import LAST, lr_factor, load_checkpoint

pytestmark = pytest.mark.threads  # float comparisons across processes, within tolerances


def test_two_process_gloo_step_averages_rank_gradients(tmp_path, make_features):
    from teranprep.teran.alignment import hinge_loss
    from teranprep.teran.config import load_config
    from teranprep.teran.data import (EpochBatchSampler, PairDataset, collate, load_split,
                                      open_features)
    from teranprep.teran.model import build_model

    splits, features = random_dataset(tmp_path, make_features)
    bert = make_tiny_bert(tmp_path / "bert", dropout=0.0)  # no randomness: hand-checkable
    config = tiny_config(bert, val_every=1000)
    for section in ("model", "image"):
        config[section]["dropout"] = 0.0
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "teranprep", "train", str(splits), "--config", str(config_path),
           "--out", str(tmp_path / "run"), "--device", "cpu", "--stop-after", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ckpt = load_checkpoint(tmp_path / "run" / LAST)
    assert ckpt["step"] == 1 and len(ckpt["rng"]) == 2

    # The same step by hand: same init, each rank's batch, gradients averaged, clip, Adam.
    resolved = load_config(config)
    t = resolved["training"]
    torch.manual_seed(t["seed"])
    model = build_model(resolved, 8)
    store = open_features(splits)
    dataset = PairDataset(load_split(splits, "train", store), store)
    grads = []
    for rank in range(2):
        sampler = EpochBatchSampler(len(dataset), t["batch_size"], t["seed"], rank, 2)
        batch = collate([dataset[i] for i in next(iter(sampler))])
        model.zero_grad()
        hinge_loss(model(batch), t["margin"]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for p, g0, g1 in zip(model.parameters(), *grads):
        p.grad = (g0 + g1) / 2
    torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
    # Adam's first moment after one step is (1 - beta1) * the gradient it was given: compare
    # gradients there (parameters after a first Adam step only show the gradients' signs).
    state = ckpt["optimizer"]["state"]
    assert len(state) == len(list(model.parameters()))
    for i, p in enumerate(model.parameters()):
        torch.testing.assert_close(state[i]["exp_avg"], 0.1 * p.grad, rtol=1e-4, atol=1e-7)
    optimizer = torch.optim.Adam(model.parameters(), lr=t["lr"] * lr_factor(0, 3, t))
    optimizer.step()
    for name, value in model.state_dict().items():
        close = torch.isclose(ckpt["model"][name], value, rtol=0, atol=1e-6)
        assert close.float().mean() > 0.95, name  # a few ~0 gradients may flip sign
