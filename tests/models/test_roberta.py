"""HF RoBERTa family (BERT's rules, RoBERTa's padding-offset position ids): what is specific to it (the checks
every family passes are in ``test_family_conformance.py``)."""

from __future__ import annotations

import torch
from transformers import RobertaConfig, RobertaModel

from taft.engine.family import family_for
from taft.models.roberta import RobertaFamily
from tests.helpers import check_against_reference, example_inputs, tangent_model


def tiny_roberta(seed: int = 0, dtype=torch.float64, **overrides) -> RobertaModel:
    torch.manual_seed(seed)
    cfg = RobertaConfig(**{**dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=32, max_position_embeddings=40, pad_token_id=1), **overrides})
    return RobertaModel(cfg).eval().to(dtype)


def test_family_is_picked():
    assert isinstance(family_for(tiny_roberta()), RobertaFamily)
    assert isinstance(family_for(tiny_roberta(is_decoder=True)), type(family_for(torch.nn.Linear(1, 1))))


def test_left_padding_shifts_positions():
    """Positions count non-padding tokens: left padding gives other positions than right padding."""
    m = tiny_roberta()
    ids = torch.tensor([[1, 1, 5, 6, 7], [5, 6, 7, 8, 9]])
    mask = (ids != 1).long()
    for scope in ("all", "last:1"):
        tm = tangent_model(m, scope)
        check_against_reference(tm, ids, attention_mask=mask)
        assert tm.fallback_modules == []


def test_inputs_embeds_and_position_ids():
    m = tiny_roberta()
    (ids,), kw = example_inputs(m)
    emb = torch.randn(*ids.shape, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tm = tangent_model(m, "all")
    check_against_reference(tm, inputs_embeds=emb, **kw)
    check_against_reference(tm, ids, kw["attention_mask"], None, torch.arange(2, 2 + ids.shape[1])[None])
    assert tm.fallback_modules == []
