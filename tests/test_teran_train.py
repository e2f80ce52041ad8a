"""prep train: run outputs, bit-for-bit resume, lineage refusal."""

from __future__ import annotations

import json

import pytest
import yaml

from teran_fixtures import make_tiny_bert, random_dataset, tiny_config, one_thread  # noqa: F401 (autouse)
from teranprep.errors import PrepError
from teranprep.pipeline.train import BEST, LAST, load_checkpoint, train


def _train_losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.fixture
def dataset(tmp_path, make_features):
    splits, features = random_dataset(tmp_path, make_features)
    return splits, features, make_tiny_bert(tmp_path / "bert")


def test_train_writes_config_checkpoints_metrics_and_plot(tmp_path, dataset):
    splits, features, bert = dataset
    run = tmp_path / "run"
    result = train(splits, tiny_config(bert), run, echo=lambda *_: None)
    assert result.step == 12  # 24 captions / batch 4 = 6 steps x 2 epochs
    assert yaml.safe_load((run / "config.yaml").read_text())["training"]["batch_size"] == 4
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4, 8, 12]
    val = [r for r in records if r["kind"] == "val"][-1]
    assert set(val["i2t"]) == {"r1", "r5", "r10", "medr", "meanr"}
    assert (run / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last, best = load_checkpoint(run / LAST), load_checkpoint(run / BEST)
    assert last["step"] == 12 and best["validation"]["rsum"] == result.best_rsum
    assert best["lineage"]["splits_manifest_sha256"] == last["lineage"]["splits_manifest_sha256"]
    # lr used by each step: linear warm-up over 3 steps, then x0.5 from epoch 2 (step 7 on).
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert [lrs[s] for s in (1, 2, 3, 6, 7, 12)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 5e-4, 5e-4])


def test_load_model_keeps_no_second_copy_of_the_weights_and_the_image_side_can_be_released(tmp_path, dataset):
    """load_model returns the metadata without the file's weights or the optimizer state (Adam's
    moments: twice the model, held for a whole eval before); the model equals the checkpoint's
    weights. release_image_side frees what only encode_images uses; captions encode as before."""
    import torch
    from teranprep.teran.checkpoint import WEIGHT_KEYS, load_model
    splits, features, bert = dataset
    run = tmp_path / "run"
    train(splits, tiny_config(bert), run, stop_after=3, echo=lambda *_: None)
    saved = load_checkpoint(run / LAST)
    assert set(WEIGHT_KEYS[:2]) <= set(saved)  # the file has them, the metadata must not
    model, meta = load_model(run / LAST)
    assert not set(WEIGHT_KEYS) & set(meta)
    assert meta["config"] == saved["config"] and meta["feature_dim"] == saved["feature_dim"]
    state = model.state_dict()
    assert state.keys() == saved["model"].keys()
    assert all(torch.equal(state[k], saved["model"][k]) for k in state)
    # ...and in memory of its own: nothing of the file stays mapped
    assert not any(line.rstrip().endswith(str((run / LAST).resolve())) for line in open("/proc/self/maps"))

    ids = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        before = model.encode_captions(ids, lengths)
        count = sum(p.numel() for p in model.parameters())
        model.release_image_side()
        after = model.encode_captions(ids, lengths)
    assert torch.equal(before, after)
    image_side = sum(p.numel() for p in saved["model"].values()) - sum(
        v.numel() for k, v in saved["model"].items()
        if not k.startswith(("image_encoder.", "image_proj.", "image_transformer.")))
    assert image_side > 0 and sum(p.numel() for p in model.parameters()) == count - image_side
    with pytest.raises(RuntimeError, match="release_image_side"):
        model.encode_images(torch.zeros(1, 3, 8), torch.zeros(1, 3, 4), torch.ones(1, 2), torch.tensor([3]))


def test_loading_refuses_weights_that_do_not_fit_in_one_line(tmp_path, dataset):
    """A checkpoint whose weights miss a key or have another shape is refused with the file
    named, before anything is copied (a copy_ would broadcast a wrong shape silently)."""
    import torch
    from teranprep.teran.checkpoint import load_model
    splits, features, bert = dataset
    run = tmp_path / "run"
    train(splits, tiny_config(bert), run, stop_after=1, echo=lambda *_: None)
    saved = load_checkpoint(run / LAST)
    name = next(k for k, v in saved["model"].items() if v.dim() == 2)
    for change, word in ((lambda m: m.pop(name), "missing"),
                         (lambda m: m.__setitem__(name, m[name][:1].clone()), "wrong shape")):
        broken = dict(saved, model=dict(saved["model"]))
        change(broken["model"])
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(PrepError, match=rf"broken.pt: its weights do not fit .*{word} {name}"):
            load_model(tmp_path / "broken.pt")


def test_copying_weights_in_hands_back_the_mapped_files_pages(tmp_path):
    """load_model reads the checkpoint memory-mapped: each tensor's pages are returned once it is
    copied in (resident KB of the file's mapping, from /proc/self/smaps, falls to about nothing),
    and the values can still be read (the pages come back from the file)."""
    import torch
    from teranprep.teran.checkpoint import _drop_pages, _mapped_ranges

    def resident_kb(path):
        total, inside = 0, False
        for line in open("/proc/self/smaps"):
            if "-" in line.split()[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path.resolve()))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.arange(4 << 20, dtype=torch.float32)}, path)  # 16 MB
    loaded = torch.load(path, mmap=True, weights_only=True)["w"]
    assert float(loaded.sum()) > 0 and resident_kb(path) >= 15 << 10  # read in: all resident
    _drop_pages(loaded, _mapped_ranges(path))
    assert resident_kb(path) < 64
    assert torch.equal(loaded, torch.arange(4 << 20, dtype=torch.float32))
    anonymous = torch.arange(4 << 20, dtype=torch.float32)
    _drop_pages(anonymous, _mapped_ranges(path))  # not in the file's mapping: left alone
    assert torch.equal(anonymous, torch.arange(4 << 20, dtype=torch.float32))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoding_captions_in_batches_equals_one_at_a_time_padded(tmp_path, dataset, precision):
    """scoring.encode_captions writes each batch into the padded result: every caption's rows
    equal the model run on that caption alone (under the same autocast, cast once to the
    precision's dtype), and the width is the longest caption's."""
    import torch
    from teranprep.teran.checkpoint import load_model
    from teranprep.teran.precision import autocast
    from teranprep.teran.scoring import encode_captions
    splits, features, bert = dataset
    train(splits, tiny_config(bert), tmp_path / "run", stop_after=1, echo=lambda *_: None)
    model, _ = load_model(tmp_path / "run" / LAST)
    ids = [[2, 5, 3], [2, 7, 9, 11, 12, 3], [2, 4, 3], [2, 6, 8, 10, 3], [2, 9, 9, 3], [2, 13, 14, 15, 16, 17, 3]]
    words, lengths = encode_captions(model, ids, batch_size=4, precision=precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert words.dtype == dtype and words.shape[:2] == (6, 7) and lengths.tolist() == [len(x) for x in ids]
    with torch.no_grad(), autocast("cpu", precision):
        for row, caption in enumerate(ids):
            t = torch.tensor([caption])
            alone = model.encode_captions(t, torch.tensor([len(caption)]))[0].to(dtype)
            tol = 1e-5 if precision == "fp32" else 2e-2  # batch shape changes the GEMMs' rounding
            torch.testing.assert_close(words[row, :len(caption)].float(), alone.float(), rtol=tol, atol=tol)


@pytest.mark.threads
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, dataset):
    splits, features, bert = dataset
    quiet = lambda *_: None  # noqa: E731
    full = train(splits, tiny_config(bert), tmp_path / "full", echo=quiet)
    # Interrupted after 5 steps (mid-epoch, past the step-4 validation), then resumed.
    part = train(splits, tiny_config(bert), tmp_path / "part", stop_after=5, echo=quiet)
    assert part.step == 5
    with pytest.raises(PrepError, match="--resume"):
        train(splits, tiny_config(bert), tmp_path / "part", echo=quiet)
    # A kill after step 6 was logged but before any checkpoint: resume redoes step 6.
    with open(tmp_path / "part" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": 6, "epoch": 0, "loss": -1.0, "lr": 0}) + "\n")
    resumed = train(splits, None, tmp_path / "part", resume=True, echo=quiet)
    assert resumed.step == 12
    assert _train_losses(tmp_path / "part") == _train_losses(tmp_path / "full")
    assert len(set(l for _, l in _train_losses(tmp_path / "full"))) > 6  # losses really move
    assert resumed.best_rsum == full.best_rsum


def test_train_refuses_splits_whose_features_changed(tmp_path, dataset):
    splits, features, bert = dataset
    manifest = features / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"test-fixture"', '"changed"'))
    with pytest.raises(PrepError, match="differs from"):
        train(splits, tiny_config(bert), tmp_path / "run", echo=lambda *_: None)
    assert not (tmp_path / "run").exists()


def _scores_pair_by_pair(model, store, data):
    """S[i, c] the slow way: each image and caption encoded alone (no padding, no batching), then
    MrSw by loops: for each kept word (1 .. len-3, the reference rule), its best region among
    slots 1 .. n (slot 0 is the global vector), summed."""
    import numpy as np
    import torch
    images = []
    with torch.no_grad():
        for key in data.image_keys:
            r = store[key]
            n, d = r.features.shape
            feats, boxes = torch.zeros(1, n + 1, d), torch.zeros(1, n + 1, 4)
            feats[0, 1:], boxes[0, 1:] = torch.from_numpy(r.features), torch.from_numpy(r.boxes)
            vecs = model.encode_images(feats, boxes, torch.tensor([[float(r.width), float(r.height)]]),
                                       torch.tensor([n + 1]))[0]
            images.append(vecs[1:].double().numpy())
        captions = []
        for ids in data.captions["input_ids"]:
            ids = torch.tensor([list(ids)], dtype=torch.long)
            vecs = model.encode_captions(ids, torch.tensor([ids.shape[1]]))[0]
            captions.append(vecs[1:ids.shape[1] - 2].double().numpy())
    scores = np.zeros((len(images), len(captions)))
    for i, regions in enumerate(images):
        for c, words in enumerate(captions):
            scores[i, c] = sum(max(float(region @ word) for region in regions) for word in words)
    return scores


def _metrics_by_hand(scores, caption_image):
    """Ranks by counting (ties against the query), then R@K, floor(median) + 1 and mean + 1."""
    import math
    import statistics
    n_img, n_cap = scores.shape
    i2t = []
    for i in range(n_img):
        best = max(scores[i, c] for c in range(n_cap) if caption_image[c] == i)
        i2t.append(sum(scores[i, c] >= best for c in range(n_cap) if caption_image[c] != i))
    t2i = [sum(scores[j, c] >= scores[caption_image[c], c] for j in range(n_img) if j != caption_image[c])
           for c in range(n_cap)]

    def summary(ranks):
        out = {f"r{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)}
        out.update(medr=math.floor(statistics.median(ranks)) + 1, meanr=sum(ranks) / len(ranks) + 1)
        return out
    m = {"i2t": summary(i2t), "t2i": summary(t2i)}
    m["rsum"] = sum(m[d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return m, i2t, t2i


def _smallest_rank_margin(scores, caption_image):
    """How far the closest compared pair of scores is from a tie: rounding below this (other
    batching, threads or CPU) cannot change a rank."""
    import numpy as np
    gaps = []
    for i in range(scores.shape[0]):
        own = caption_image == i
        gaps.append(np.abs(scores[i, ~own] - scores[i, own].max()).min())
    for c in range(scores.shape[1]):
        others = np.arange(scores.shape[0]) != caption_image[c]
        gaps.append(np.abs(scores[others, c] - scores[caption_image[c], c]).min())
    return float(min(gaps))


@pytest.mark.threads
def test_eval_protocols_match_a_pair_by_pair_computation(tmp_path, dataset, monkeypatch):
    import numpy as np
    from teranprep.pipeline.evaluate import evaluate
    from teranprep.teran.checkpoint import load_model
    from teranprep.teran.data import load_split, open_features

    splits, features, bert = dataset
    run = tmp_path / "run"
    train(splits, tiny_config(bert, epochs=1, val_every=6), run, echo=lambda *_: None)
    model, _ = load_model(run)
    store = open_features(splits)
    data = load_split(splits, "test", store)
    scores = _scores_pair_by_pair(model, store, data)
    # float32 batched vs float64 unbatched agree to ~1e-6; ranks are safe with a margin far above it
    assert _smallest_rank_margin(scores, data.caption_image) > 1e-4
    # and so is every ordering (NDCG ranks all candidates): no two scores of a query within 1e-4
    # (measured 0.0125 here)
    assert min(np.diff(np.sort(scores, axis=1), axis=1).min(), np.diff(np.sort(scores, axis=0), axis=0).min()) > 1e-4
    quiet = lambda *_: None  # noqa: E731
    whole = evaluate(run, splits, protocol="all", image_block=3, caption_block=5, echo=quiet)
    want, i2t, t2i = _metrics_by_hand(scores, data.caption_image)
    # Measured once (was: 0 < rsum < 600; 387.5 until the attention ran through
    # scaled_dot_product_attention, whose dropout draws come in another order).
    # Ranks are integers behind a 1e-4 score margin (asserted above, 0.0125 measured), far above
    # the ~1e-7 rounding a CPU, thread count or kernel changes in this 6-step training, so the
    # same on any machine; a training or scoring change moves them.
    assert want["rsum"] == 450.0
    from teran_fixtures import ndcg25_by_hand
    from teranprep.pipeline.relevance import split_captions
    raw, owner, _ = split_captions(splits / "test.parquet")
    assert owner.tolist() == data.caption_image.tolist()
    ndcg = ndcg25_by_hand(raw, owner, np.argsort(-scores.T, axis=1).tolist(), np.argsort(-scores, axis=1).tolist())
    for d in ("i2t", "t2i"):
        assert {k: whole[d][k] for k in want[d]} == pytest.approx(want[d], rel=1e-12)
        # was: 0 < ndcg <= 1; now the value of a query-by-query computation on the pair-by-pair scores
        assert whole[d]["ndcg_rougeL"] == pytest.approx(ndcg[d], rel=1e-6), d
    assert whole["rsum"] == pytest.approx(want["rsum"], rel=1e-12)
    saved = np.load(run / "eval-test-all" / "rankings.npz")
    assert saved["i2t_rank"].tolist() == i2t
    assert saved["t2i_rank"][np.argsort(saved["caption_index"])].tolist() == t2i
    # captions encoded and scored 3 at a time (eval's caption blocks; 8 test captions: 3 blocks)
    import teranprep.pipeline.evaluate as evaluate_module
    monkeypatch.setattr(evaluate_module, "CAPTION_ENCODE_BLOCKS", 1)
    streamed = evaluate(run, splits, protocol="all", image_block=3, caption_block=3,
                        out=tmp_path / "streamed", echo=quiet)
    for d in ("i2t", "t2i"):
        assert {k: streamed[d][k] for k in want[d]} == pytest.approx(want[d], rel=1e-12)
        assert streamed[d]["ndcg_rougeL"] == pytest.approx(whole[d]["ndcg_rougeL"], rel=1e-9)
    again = np.load(tmp_path / "streamed" / "rankings.npz")
    assert again["i2t_rank"].tolist() == i2t and again["i2t_top"].tolist() == saved["i2t_top"].tolist()
    assert again["t2i_top"].tolist() == saved["t2i_top"].tolist()
    monkeypatch.undo()
    folds = evaluate(run, splits, protocol="1k", fold_size=2, echo=quiet)
    by_fold = []
    for f in range(2):
        caps = np.flatnonzero(np.isin(data.caption_image, [2 * f, 2 * f + 1]))
        by_fold.append(_metrics_by_hand(scores[2 * f:2 * f + 2][:, caps], data.caption_image[caps] - 2 * f)[0])
    assert [f["rsum"] for f in folds["folds"]] == pytest.approx([f["rsum"] for f in by_fold])
    assert folds["rsum"] == pytest.approx((by_fold[0]["rsum"] + by_fold[1]["rsum"]) / 2)
    assert {k: folds["i2t"][k] for k in by_fold[0]["i2t"]} == pytest.approx(
        {k: (by_fold[0]["i2t"][k] + by_fold[1]["i2t"][k]) / 2 for k in by_fold[0]["i2t"]})
    with pytest.raises(PrepError, match="whole folds"):
        evaluate(run, splits, protocol="1k", fold_size=3, echo=quiet)
    with pytest.raises(PrepError, match="5K protocol"):
        evaluate(run, splits, protocol="5k", echo=quiet)


def test_cli_train_reports_lineage_mismatch_as_one_error_line(tmp_path, dataset):
    from click.testing import CliRunner
    from teranprep.cli import main
    splits, features, bert = dataset
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(bert, epochs=1, val_every=100)))
    ok = CliRunner().invoke(main, ["train", str(splits), "--config", str(config), "--out", str(tmp_path / "run")])
    assert ok.exit_code == 0, ok.output
    assert "6 steps" in ok.output and (tmp_path / "run" / LAST).is_file()
    again = CliRunner().invoke(main, ["train", str(splits), "--out", str(tmp_path / "run"), "--resume"])
    assert again.exit_code == 0 and "6 steps" in again.output, again.output  # finished: nothing to do
    missing = CliRunner().invoke(main, ["train", str(splits), "--out", str(tmp_path / "run3")])
    assert missing.exit_code == 2 and "--config is required" in missing.output
    manifest = features / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    bad = CliRunner().invoke(main, ["train", str(splits), "--config", str(config), "--out", str(tmp_path / "run2")])
    assert bad.exit_code == 2
    assert bad.output.startswith("error: ") and "manifest.json" in bad.output and len(bad.output.splitlines()) == 1


def test_loader_workers_read_the_same_batches_as_the_main_process(tmp_path, dataset):
    import torch
    from teranprep.teran.data import EpochBatchSampler, PairDataset, load_split, make_loader, open_features
    splits, _, _ = dataset
    store = open_features(splits)
    store["img000.jpg"]  # open a shard handle before the fork: workers must reopen theirs
    data = PairDataset(load_split(splits, "train", store), store)
    def batches(workers):
        sampler = EpochBatchSampler(len(data), 4, seed=3)
        sampler.set_position(epoch=1, start_batch=2)
        return list(make_loader(data, batch_sampler=sampler, num_workers=workers))
    inline, forked = batches(0), batches(2)
    assert len(inline) == 4
    for a, b in zip(inline, forked):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Regions are padded behind the zero slot 0 and match the features read directly.
    first = inline[0]
    i = int(first["index"][0])
    regions = store[data.keys[i]]
    n = len(regions)
    assert int(first["region_lengths"][0]) == n + 1
    assert torch.equal(first["features"][0, 0], torch.zeros(8))
    assert torch.equal(first["features"][0, 1:n + 1], torch.from_numpy(regions.features))


def test_features_without_image_sizes_are_refused(tmp_path):
    """Imported features may lack image sizes (-1); box vectors would be garbage, so training refuses."""
    import numpy as np
    import pandas as pd
    from teranprep.errors import PrepError
    from teranprep.manifests import FeatureStore
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import Regions
    from teranprep.teran.data import load_split
    regions = [Regions(k, w, 50, np.zeros((2, 4), np.float32), np.ones((2, 3), np.float32))
               for k, w in (("a.jpg", 40), ("b.jpg", -1))]
    write_features(tmp_path / "f", regions, feature_dim=3, columns=())
    split = tmp_path / "s"
    split.mkdir()
    pd.DataFrame({"image_key": ["a.jpg", "b.jpg"], "caption_id": [0, 1], "raw": ["x", "y"],
                  "input_ids": [[101, 102], [101, 102]]}).to_parquet(split / "train.parquet")
    store = FeatureStore(tmp_path / "f")
    with pytest.raises(PrepError, match="b.jpg"):
        load_split(split, "train", store)
    (split / "train.parquet").unlink()
    pd.DataFrame({"image_key": ["a.jpg"], "caption_id": [0], "raw": ["x"],
                  "input_ids": [[101, 102]]}).to_parquet(split / "train.parquet")
    assert load_split(split, "train", store).image_keys == ["a.jpg"]


def test_cpu_optimizer_is_fused_adam_and_updates_as_plain_adam_does():
    """make_optimizer's fused CPU Adam against torch's for-loop Adam (the optimizer train() used
    before), on the same model, batches and losses: the same parameters after every step."""
    import copy

    import torch
    from torch import nn

    from teranprep.pipeline.train import make_optimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    plain, start = copy.deepcopy(model), copy.deepcopy(model)
    fused = make_optimizer(model, {"lr": 1e-3}, torch.device("cpu"))
    assert fused.param_groups[0]["fused"] is True
    unfused = torch.optim.Adam(plain.parameters(), lr=1e-3, foreach=False, fused=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 16, generator=g)
        for m, opt in ((model, fused), (plain, unfused)):
            opt.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0)
            opt.step()
        for a, b in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # not a vacuous comparison: 5 steps of lr 1e-3 moved every parameter tensor
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(model.parameters(), start.parameters()))
