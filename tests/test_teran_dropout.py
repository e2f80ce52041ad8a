"""cpu_dropout / Dropout: TERAN's training dropout on a CPU, against the distribution it must have."""

import math

import pytest
import torch
from torch import nn

from teranprep.teran.model import DROP_LEVELS, Dropout, TERAN, cpu_dropout, use_cpu_dropout

N = 400_000


def _effective(p):
    drop = round(p * DROP_LEVELS)
    return drop / DROP_LEVELS, DROP_LEVELS / (DROP_LEVELS - drop)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_element_is_dropped_with_p_and_kept_ones_scaled_by_one_over_one_minus_p(p):
    torch.manual_seed(0)
    out = cpu_dropout(torch.ones(N), p)
    p_eff, scale = _effective(p)
    assert abs(p_eff - p) <= 0.5 / DROP_LEVELS
    dropped = out == 0
    assert torch.equal(out[~dropped], torch.full_like(out[~dropped], scale))  # one rounding of 1 * scale
    # Every slot of the 64-bit words (position mod 4) draws with the same p: a draw that left the
    # top bit of each word at 0 would keep every fourth element whatever p is.
    sigma = math.sqrt(N / 4 * p_eff * (1 - p_eff))
    for slot in range(4):
        assert abs(int(dropped[slot::4].sum()) - N / 4 * p_eff) < 6 * sigma, slot
    # the expectation of each output is its input: the mean over N is 1 within 6 sigma
    assert abs(float(out.double().mean()) - 1.0) < 6 * scale * sigma * 2 / N


def test_the_gradient_is_the_kept_mask_times_the_scale():
    torch.manual_seed(1)
    x = (torch.rand(64, 33) + 1).requires_grad_()  # no zero input: a zero output is a dropped one
    w = torch.randn(64, 33)
    out = cpu_dropout(x, 0.25)
    (out * w).sum().backward()
    _, scale = _effective(0.25)
    kept = out != 0
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(x.grad, torch.where(kept, w * scale, torch.zeros(())))
    assert torch.equal(out, torch.where(kept, x.detach() * scale, torch.zeros(())))


def test_draws_follow_the_seed_and_inplace_gives_the_same_values():
    x = torch.randn(3, 50, 7)
    torch.manual_seed(5)
    a = cpu_dropout(x, 0.1)
    torch.manual_seed(5)
    y = x.clone()
    b = cpu_dropout(y, 0.1, inplace=True)
    assert b.data_ptr() == y.data_ptr() and torch.equal(a, b)
    torch.manual_seed(6)
    assert not torch.equal(a, cpu_dropout(x, 0.1))
    # a non-contiguous input keeps its shape and its values' places
    t = x.transpose(0, 2)
    torch.manual_seed(5)
    c = cpu_dropout(t, 0.1)
    assert c.shape == t.shape and torch.equal(c[c != 0], (t * _effective(0.1)[1])[c != 0])


def test_bf16_input_stays_bf16_with_one_rounding():
    torch.manual_seed(2)
    x = torch.randn(1000).bfloat16()
    out = cpu_dropout(x, 0.1)
    assert out.dtype == torch.bfloat16
    kept = out != 0
    want = (x.float() * _effective(0.1)[1]).bfloat16()
    assert torch.equal(out[kept], want[kept])


def test_probabilities_16_bits_cannot_hold_go_to_torch_dropout():
    x = torch.ones(1000)
    assert torch.equal(cpu_dropout(x, 1.0), torch.zeros(1000))
    torch.manual_seed(3)
    tiny = cpu_dropout(x, 1e-7)  # rounds to 0 levels: F.dropout's own p, not "never drop"
    torch.manual_seed(3)
    assert torch.equal(tiny, nn.functional.dropout(x, 1e-7, True))


def test_dropout_module_is_nn_dropout_in_eval_and_replaces_every_plain_one(tmp_path):
    d = Dropout(0.3)
    x = torch.randn(20, 5)
    d.eval()
    assert torch.equal(d(x), x)
    d.train()
    assert (d(x) == 0).any()
    assert torch.equal(Dropout(0.0).train()(x), x)
    seq = use_cpu_dropout(nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.2, inplace=True)))
    assert type(seq[1]) is Dropout and seq[1].p == 0.2 and seq[1].inplace
    from teran_fixtures import make_tiny_bert, tiny_config
    from teranprep.teran.config import load_config
    from teranprep.teran.model import build_model
    model = build_model(load_config(tiny_config(make_tiny_bert(tmp_path / "bert"))), 16)
    assert isinstance(model, TERAN)
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.Dropout)]
    assert kinds and set(kinds) == {Dropout}  # the text encoder's included
    assert len([m for m in model.text_encoder.modules() if isinstance(m, Dropout)]) > 0
