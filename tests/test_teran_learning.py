"""The model learns: planted word-region signal -> high held-out recall; eval + CLI on the result."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from teran_fixtures import make_tiny_bert, planted_config, planted_dataset, write_tiny_tokenizer, one_thread  # noqa: F401 (autouse)
from teranprep.cli import main
from teranprep.pipeline.evaluate import evaluate
from teranprep.pipeline.train import train


def test_planted_signal_reaches_high_recall_on_held_out_images(tmp_path):
    splits, features, concepts_of = planted_dataset(tmp_path)
    bert = make_tiny_bert(tmp_path / "bert", vocab_size=40, hidden=32, layers=1)
    config = planted_config(bert)
    run = tmp_path / "run"
    result = train(splits, config, run, echo=lambda *_: None)
    assert result.step == 200
    metrics = evaluate(run, splits, split="test", echo=lambda *_: None)
    print(json.dumps({d: metrics[d] for d in ("i2t", "t2i")}))
    assert metrics["i2t"]["r1"] > 80 and metrics["t2i"]["r1"] > 80
    first_val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
                 if '"val"' in l][0]
    assert first_val["step"] == 100

    ranks = np.load(run / "eval-test-all" / "rankings.npz")
    assert len(ranks["image_keys"]) == 30 and len(ranks["t2i_rank"]) == 60
    assert np.mean(ranks["i2t_rank"] < 1) * 100 == metrics["i2t"]["r1"]
    # The same evaluation through the CLI, on the best checkpoint file.
    cli = CliRunner().invoke(main, ["eval", str(run / "checkpoint_best.pt"), "--splits", str(splits),
                                    "--split", "test", "--out", str(tmp_path / "cli-eval")])
    assert cli.exit_code == 0, cli.output
    assert "rsum" in cli.output
    assert json.loads((tmp_path / "cli-eval" / "metrics.json").read_text())["rsum"] == metrics["rsum"]

    # Word-level alignment: each word's best region is the region showing the concept it names.
    from PIL import Image
    from teranprep.manifests import FeatureStore
    from teranprep.teran.checkpoint import load_model
    from teranprep.teran.visualize import word_region_alignment
    model, _ = load_model(run)
    store = FeatureStore(features)
    test_keys = sorted(concepts_of)[-30:]
    hits = total = 0
    for key in test_keys:
        concepts = concepts_of[key]
        ids = [2] + [5 + c for c in reversed(concepts)] + [4, 3]
        for pos, region, _ in word_region_alignment(model, store[key], ids)[:len(concepts)]:
            hits += concepts[region] == ids[pos] - 5
            total += 1
    assert hits / total > 0.7, (hits, total)  # chance: 1/3 (three regions per image)

    write_tiny_tokenizer(tmp_path / "tok")
    key = test_keys[0]
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (100, 100), (30, 90, 150)).save(images / key, format="JPEG")
    words = " ".join(f"w{5 + c}" for c in concepts_of[key])
    cli = CliRunner().invoke(main, ["show-alignment", str(run), key, words, "-o", str(tmp_path / "a.png"),
                                    "--tokenizer", str(tmp_path / "tok"), "--images", str(images)])
    assert cli.exit_code == 0, cli.output
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    lines = [l for l in cli.output.splitlines() if "-> region" in l]
    assert [l.split()[0] for l in lines] == words.split()
    direct = word_region_alignment(model, store[key], [2] + [5 + c for c in concepts_of[key]] + [3])
    assert [int(l.split()[3]) for l in lines] == [region for _, region, _ in direct]
