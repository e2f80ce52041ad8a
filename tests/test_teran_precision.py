"""bf16 through autocast: planted-signal training still learns, eval reports its drift from fp32,
resume refuses another precision, the data-wait share is logged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from teran_fixtures import make_tiny_bert, planted_config, planted_dataset, random_dataset, tiny_config, one_thread  # noqa: F401 (autouse)
from teranprep.cli import main
from teranprep.errors import PrepError
from teranprep.pipeline.evaluate import evaluate
from teranprep.pipeline.train import train


def test_bf16_training_on_planted_signal_reaches_high_recall(tmp_path):
    splits, features, _ = planted_dataset(tmp_path)
    bert = make_tiny_bert(tmp_path / "bert", vocab_size=40, hidden=32, layers=1)
    run = tmp_path / "run"
    result = train(splits, planted_config(bert), run, precision="bf16", echo=lambda *_: None)
    assert result.step == 200
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["precision"] == "bf16"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(r["precision"] == "bf16" and 0 <= r["data_wait_share"] < 1 for r in train_records)

    metrics = evaluate(run, splits, split="test", precision="bf16", echo=lambda *_: None)
    assert metrics["i2t"]["r1"] > 80 and metrics["t2i"]["r1"] > 80, metrics
    assert metrics["precision"] == "bf16"
    assert (run / "eval-test-all-bf16" / "metrics.json").is_file()
    # The drift is measured against an fp32 evaluation of the same checkpoint: recompute it.
    fp32 = evaluate(run, splits, split="test", echo=lambda *_: None)
    assert fp32["precision"] == "fp32" and "drift_vs_fp32" not in fp32
    drift = metrics["drift_vs_fp32"]
    for d in ("i2t", "t2i"):
        for k in ("r1", "r5", "r10"):
            assert drift["fp32_recall"][d][k] == fp32[d][k]
            assert drift["recall_difference"][d][k] == pytest.approx(metrics[d][k] - fp32[d][k])
    assert drift["score_correlation"] > 0.999

    # A resumed run keeps its precision: asking for another one is refused before any work.
    with pytest.raises(PrepError, match="trains in bf16"):
        train(splits, None, run, resume=True, precision="fp32", echo=lambda *_: None)
    cli = CliRunner().invoke(main, ["train", str(splits), "--out", str(run), "--resume",
                                    "--precision", "fp32"])
    assert cli.exit_code == 2 and "error:" in cli.output and "Traceback" not in cli.output


def test_eval_refuses_drift_without_bf16_and_unknown_precision(tmp_path, make_features):
    splits, _ = random_dataset(tmp_path, make_features)
    bert = make_tiny_bert(tmp_path / "bert")
    run = tmp_path / "run"
    train(splits, tiny_config(bert, epochs=1), run, echo=lambda *_: None)
    with pytest.raises(PrepError, match="needs --precision bf16"):
        evaluate(run, splits, drift=True, echo=lambda *_: None)
    with pytest.raises(PrepError, match="choose one of"):
        evaluate(run, splits, precision="fp16", echo=lambda *_: None)
    cli = CliRunner().invoke(main, ["eval", str(run), "--splits", str(splits), "--precision", "bf16",
                                    "--out", str(tmp_path / "e")])
    assert cli.exit_code == 0, cli.output
    assert "drift vs fp32" in cli.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["precision"] == "bf16"


def test_bf16_scores_are_bf16_products_summed_in_fp32():
    """score_matrix at bf16 equals an fp64 computation on the bf16-rounded similarities."""
    from teranprep.teran.alignment import region_keep_mask, word_keep_mask
    from teranprep.teran.scoring import score_matrix
    g = torch.Generator().manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(7, 6, 32, generator=g), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(9, 8, 32, generator=g), dim=-1)
    rlens, wlens = torch.tensor([6, 4, 3, 6, 5, 2, 6]), torch.tensor([8, 6, 5, 7, 8, 4, 6, 8, 5])
    got = score_matrix(regions, rlens, words, wlens, precision="bf16", image_block=3, caption_block=4)
    rb, wb = regions.bfloat16(), words.bfloat16()
    sims = torch.einsum("ird,cwd->ircw", rb.double(), wb.double())
    sims = sims.to(torch.bfloat16).double()  # the GEMM's output is rounded to bf16
    rmask = region_keep_mask(rlens, 6)[:, :, None, None]
    wmask = word_keep_mask(wlens, 8, "reference")[None]
    best = sims.masked_fill(~rmask, -np.inf).amax(1)
    want = best.masked_fill(~wmask, 0).sum(2).numpy()
    # Summation order differs (fp32 vs fp64 over <= 8 terms of |x| <= 1): 1e-5 covers it, while
    # the bf16 rounding itself moves scores by ~1e-3. Another CPU's GEMM may accumulate in
    # another order and round a similarity to the neighbouring bf16 value (one ulp, <= 2^-8 for
    # |x| <= 1, per summed word): allowed for a few scores, never more than that.
    error = np.abs(got - want)
    assert error.max() <= 8 * 2.0 ** -8 and np.mean(error <= 1e-5) >= 0.9, error.max()
    fp32 = score_matrix(regions, rlens, words, wlens, image_block=3, caption_block=4)
    assert np.abs(fp32 - got).max() > 1e-4
