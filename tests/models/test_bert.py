"""HF BERT family (MiniLM with real weights, and a small random-init config): what is specific to it (the
checks every family passes, on the small config, are in ``test_family_conformance.py``)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from tests.helpers import assert_close, check_against_reference, example_inputs, tangent_model


def tiny_bert(seed: int = 0, dtype=torch.float64) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32, max_position_embeddings=32)
    return BertModel(cfg).eval().to(dtype)


def test_sequence_length_one():
    m = tiny_bert()
    tm = tangent_model(m, "all")
    ids = torch.tensor([[3], [7]])
    check_against_reference(tm, ids, attention_mask=torch.ones_like(ids))


def test_padding_tokens_do_not_leak():
    """Changing a padded token's id must not change the unpadded positions (primal or tangent)."""
    m = tiny_bert()
    tm = tangent_model(m, "all")
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    f0a, ta = tm.forward_parts(ids, attention_mask=mask)
    f0b, tb = tm.forward_parts(ids.clone().index_fill_(1, torch.tensor([3]), 9), attention_mask=mask)
    assert torch.equal(f0a[:, :3], f0b[:, :3]) and torch.equal(ta[:, :3], tb[:, :3])


def test_mask_edited_in_place_between_calls():
    """The per-forward mask (``None`` when nothing is padded) is rebuilt for every call, also for the same tensor."""
    m = tiny_bert()
    tm = tangent_model(m, "all")
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    check_against_reference(tm, ids, attention_mask=mask)
    mask[0, 2:] = 0
    check_against_reference(tm, ids, attention_mask=mask)


def test_force_fallback_matches_rules():
    m = tiny_bert()
    tm = tangent_model(m, "last:1")
    args, kw = example_inputs(m)
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
        tm = tangent_model(m, scope, 1e-2)
        args, kw = example_inputs(m, 3)
        check_against_reference(tm, *args, **kw)
        assert tm.fallback_modules == []


@pytest.mark.slow
def test_minilm_real_weights_float32(minilm):
    m = minilm.float()
    tm = tangent_model(m, "all", 1e-2)
    args, kw = example_inputs(m, 2)
    check_against_reference(tm, *args, dtype=torch.float32, **kw)
