"""Original TERAN checkpoints: a file with the reference's module names and shapes (built here with
random values, saved the 2020 way) loads into our model and scores exactly as the reference computes."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from teranprep.errors import PrepError
from teranprep.extractors.weights import load_torch_file
from teranprep.pipeline.evaluate import load_model
from teranprep.teran.reference_import import REFERENCE_SAFE_GLOBALS

pytestmark = pytest.mark.threads  # float comparisons with the reference code, within tolerances

FEAT, EMBED, HIDDEN = 8, 16, 128


def _encoder(d, layers):
    # The reference's layers: 4 heads, FFN 2048, ReLU, post-norm, sequence-first.
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 2048, 0.1, "relu"), layers,
                                 enable_nested_tensor=False)


class RefTxt(nn.Module):
    def __init__(self):
        super().__init__()
        self.bert_model = BertModel(BertConfig(vocab_size=50, hidden_size=HIDDEN, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=256,
                                               max_position_embeddings=40))
        self.word_embeddings = self.bert_model.get_input_embeddings()
        self.map = nn.Linear(HIDDEN, EMBED)


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
    def __init__(self):
        super().__init__()
        self.txt_enc, self.img_enc = RefTxt(), RefImg()
        self.img_proj, self.cap_proj = nn.Linear(FEAT, EMBED), nn.Linear(HIDDEN, EMBED)
        self.transformer_encoder_1, self.transformer_encoder_2 = _encoder(EMBED, 2), _encoder(EMBED, 2)


class RefTERAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_txt_enc = RefJoint()

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


def _reference_file(tmp_path, mode="symm", shared=False):
    torch.manual_seed(3)
    ref = RefTERAN().eval()
    config = {"text-model": {"name": "bert", "pretrain": "bert-base-uncased", "word-dim": HIDDEN,
                             "extraction-hidden-layer": 2, "layers": 0, "dropout": 0.1},
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


@pytest.mark.parametrize("mode", ["MrSw", "symm"])
def test_reference_checkpoint_scores_like_the_reference(tmp_path, mode):
    ref, path = _reference_file(tmp_path, mode)
    assert not path.read_bytes().startswith(b"PK")  # legacy, non-zip serialisation
    model, ckpt = load_model(path)
    assert "img_txt_enc.img_enc.fc.weight" in ckpt["dropped_keys"]
    assert "img_txt_enc.txt_enc.map.weight" in ckpt["dropped_keys"]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 6, FEAT, generator=g)
    feats[:, 0] = 0  # slot 0
    boxes = torch.rand(3, 6, 4, generator=g) * 40
    boxes[..., 2:] += boxes[..., :2] + 5
    boxes[:, 0] = 0
    sizes = torch.tensor([[100.0, 80.0], [120.0, 90.0], [60.0, 60.0]])
    rlen = torch.tensor([6, 6, 6])
    ids = torch.randint(5, 50, (4, 9), generator=g)
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
