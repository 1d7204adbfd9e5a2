"""HF BERT family (MiniLM with real weights, and a small random-init config) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from taft.tangent_model import TangentModel
from tests.helpers import assert_close, check_against_reference, check_finite_difference, randomize_delta


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg).eval().double()


def inputs(model, batch=3, seed=0):
    from taft.engine.family import family_for

    return family_for(model).example_inputs(batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scope", ["all", "last:1", "last:2", "attn", "re:.*LayerNorm.*", "!re:.*bias,all"])
def test_tiny_bert_matches_reference(scope):
    m = tiny_bert()
    tm = TangentModel(m, scope)
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


@pytest.mark.parametrize("batch", [1, 4])
def test_tiny_bert_finite_difference(batch):
    m = tiny_bert()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m, batch)
    check_finite_difference(tm, *args, **kw)


def test_sequence_length_one():
    m = tiny_bert()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    ids = torch.tensor([[3], [7]])
    check_against_reference(tm, ids, attention_mask=torch.ones_like(ids))


def test_padding_tokens_do_not_leak():
    """Changing a padded token's id must not change the unpadded positions (primal or tangent)."""
    m = tiny_bert()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    f0a, ta = tm.forward_parts(ids, attention_mask=mask)
    f0b, tb = tm.forward_parts(ids.clone().index_fill_(1, torch.tensor([3]), 9), attention_mask=mask)
    assert torch.equal(f0a[:, :3], f0b[:, :3]) and torch.equal(ta[:, :3], tb[:, :3])


def test_force_fallback_matches_rules():
    m = tiny_bert()
    tm = TangentModel(m, "last:1")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    f0, t = tm.forward_parts(*args, **kw)
    tm.force_fallback = True
    f0r, tr = tm.forward_parts(*args, **kw)
    assert tm.fallback_modules == ["encoder.layer.1"]
    assert_close(f0.detach(), f0r.detach(), what="primal")
    assert_close(t.detach(), tr.detach(), what="tangent")


@pytest.mark.slow
def test_minilm_real_weights_float64(minilm):
    m = minilm.double()
    for scope in ("all", "last:1", "attn"):
        tm = TangentModel(m, scope)
        randomize_delta(tm, 1e-2)
        args, kw = inputs(m, 3)
        check_against_reference(tm, *args, **kw)
        assert tm.fallback_modules == []


@pytest.mark.slow
def test_minilm_real_weights_float32(minilm):
    m = minilm.float()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 1e-2)
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    from taft.engine.reference import reference_jvp

    y, ty = reference_jvp(tm, *args, **kw)
    assert_close(f0.detach(), y, what="primal", dtype=torch.float32)
    assert_close(t.detach(), ty, what="tangent", dtype=torch.float32)
