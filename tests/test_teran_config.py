"""Bundled configs carry the paper's settings; bad configs and unavailable encoders fail clearly."""

from __future__ import annotations

import pytest
import torch

from teran_fixtures import make_tiny_bert
from teranprep.errors import PrepError
from teranprep.teran.config import load_config
from teranprep.teran.text_encoder import load_text_encoder


def test_paper_configs_hold_the_published_settings():
    coco, f30k = load_config("teran_coco"), load_config("configs/teran_f30k.yaml")
    for c in (coco, f30k):
        t = c["training"]
        assert (t["epochs"], t["lr"], t["lr_decay"], t["lr_decay_epochs"], t["grad_clip"],
                t["margin"], t["val_every"]) == (30, 1e-5, 0.1, 20, 2.0, 0.2, 500)
        assert c["text"]["layers"] == 6 and c["model"]["embed_dim"] == 1024
        assert (c["image"]["feature_dim"], c["image"]["layers"], c["model"]["joint_layers"]) == (2048, 4, 2)
        assert c["alignment"] == {"mode": "MrSw", "drop_tokens": "reference", "word_max_floor_zero": True}
    assert (coco["training"]["batch_size"], coco["training"]["warmup_iters"]) == (40, 0)
    assert (f30k["training"]["batch_size"], f30k["training"]["warmup_iters"]) == (30, 1000)
    assert load_config("teran_small.yaml")["text"]["encoder"] == "minilm"


def test_config_typos_and_bad_values_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batchsize: 4\n")
    with pytest.raises(PrepError, match="batchsize"):
        load_config(bad)
    bad.write_text("alignment:\n  mode: mean\n")
    with pytest.raises(PrepError, match="alignment.mode"):
        load_config(bad)
    bad.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(PrepError, match="YAML"):
        load_config(bad)
    with pytest.raises(PrepError, match="teran_small"):
        load_config("no_such_config")


def test_hub_name_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(PrepError, match="offline"):
        load_text_encoder("bert-base-uncased", 6)


def test_text_encoder_keeps_the_first_layers_of_a_local_dir(tmp_path):
    from transformers import BertModel
    full = BertModel.from_pretrained(make_tiny_bert(tmp_path / "bert", layers=3))
    cut = load_text_encoder(str(tmp_path / "bert"), 2)
    assert cut.config.num_hidden_layers == 2 and len(cut.encoder.layer) == 2
    for name, value in cut.state_dict().items():
        assert torch.equal(value, full.state_dict()[name]), name
    with pytest.raises(PrepError, match="only 3 layers"):
        load_text_encoder(str(tmp_path / "bert"), 4)


@pytest.mark.fullsize
def test_teran_small_builds_on_the_offline_minilm():
    from teranprep.teran.model import build_model
    from teranprep.tokenizers import load_wordpiece
    model = build_model(load_config("teran_small"), feature_dim=2048).eval()
    assert model.text_encoder.config.hidden_size == 384 and len(model.text_encoder.encoder.layer) == 2
    ids, _ = load_wordpiece("minilm").encode(["a dog on a red sofa ."], 32)
    with torch.no_grad():
        words = model.encode_captions(torch.tensor(ids), torch.tensor([len(ids[0])]))
    assert words.shape == (1, len(ids[0]), 256)
    torch.testing.assert_close(words.norm(dim=-1), torch.ones(1, len(ids[0])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_layer_equals_torchs_transformer_layer_with_the_same_weights(dtype):
    """teran.model.EncoderLayer (attention through scaled_dot_product_attention) against
    nn.TransformerEncoderLayer: the same parameter names and initial values from the same seed,
    and with dropout off the same outputs and gradients on padded batches, in fp32 and under bf16
    autocast; padded keys are never attended to (changing them changes no unpadded output)."""
    from torch import nn
    from teranprep.teran.model import EncoderLayer
    kwargs = dict(d_model=32, nhead=4, dim_feedforward=48, dropout=0.1, activation="relu", batch_first=True)
    torch.manual_seed(3)
    theirs = nn.TransformerEncoder(nn.TransformerEncoderLayer(**kwargs), 2, enable_nested_tensor=False)
    torch.manual_seed(3)
    ours = nn.TransformerEncoder(EncoderLayer(**kwargs), 2, enable_nested_tensor=False)
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, 32, generator=g)
    pad = torch.arange(9)[None, :] >= torch.tensor([9, 4, 1, 7, 2])[:, None]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for module in (theirs, ours):
        module.train()
        for m in module.modules():  # dropout off: the draws differ, not the formula
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        module.layers[0].self_attn.dropout = module.layers[1].self_attn.dropout = 0.0
    outs, grads = [], []
    for module in (theirs, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = module(xi, src_key_padding_mask=pad)
        (y.float() * torch.linspace(-1, 1, 32)).sum().backward()
        outs.append(y.float())
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)
    for g_ours, g_theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_ours.float(), g_theirs.float(), rtol=tol * 10, atol=tol * 10)
    ours.eval()
    changed = x.clone()
    changed[pad] = 100.0
    with torch.no_grad():
        same = ours(x, src_key_padding_mask=pad), ours(changed, src_key_padding_mask=pad)
    assert torch.equal(same[0][~pad], same[1][~pad])
