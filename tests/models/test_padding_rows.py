"""A batch row with no token to attend to (all padding), in the text families (BERT, RoBERTa).

What a model computes for such a row depends on its attention kernel, not on the weights: eager attention spreads
the softmax uniformly over the padding, SDPA returns zeros; the tangent cannot promise either, so the families
refuse the row with a clear error instead of returning a number that differs from the model's own (relative
error 0.28 under SDPA before). Rows with at least one token still match the model's own forward exactly."""

from __future__ import annotations

import pytest
import torch

from taft.engine.reference import max_rel_err
from taft.errors import TaftError
from tests.helpers import TOL, check_against_reference, tangent_model
from tests.models.test_bert import tiny_bert
from tests.models.test_roberta import tiny_roberta

IDS = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [9, 4, 3, 2]])
MASK = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]])  # row 1: all padding


def _models():
    for name, make in (("bert", tiny_bert), ("roberta", tiny_roberta)):
        for impl in ("sdpa", "eager"):
            m = make()
            m.set_attn_implementation(impl)
            yield pytest.param(m, id=f"{name}-{impl}")


@pytest.mark.parametrize("model", list(_models()))
def test_all_padding_row_is_refused(model):
    assert model.dtype == torch.float64
    tm = tangent_model(model, "all")
    with pytest.raises(TaftError, match=r"row 1 of the batch has no token to attend to \(all padding"):
        tm.forward_parts(IDS, attention_mask=MASK)
    with pytest.raises(TaftError, match="row 0 of the batch has no token to attend to"):
        tm.forward_parts(IDS[1:2], attention_mask=MASK[1:2])


@pytest.mark.parametrize("model", list(_models()))
def test_rows_with_tokens_match_the_models_own_forward(model):
    """The same batch without the empty row: primal equals the model's own forward in float64, the tangent
    equals torch.func.jvp of it."""
    keep = torch.tensor([0, 2])
    ids, mask = IDS[keep], MASK[keep]
    tm = tangent_model(model, "all")
    f0, _ = tm.forward_parts(ids, attention_mask=mask)
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert max_rel_err(f0.detach(), own) <= TOL[torch.float64]
    check_against_reference(tm, ids, attention_mask=mask)


def test_a_4d_mask_with_a_query_that_sees_nothing_is_refused():
    m = tiny_bert()
    tm = tangent_model(m, "all")
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[1, 0, 2, :] = False  # row 1, query 2 attends to nothing
    with pytest.raises(TaftError, match="row 1 of the batch has no token to attend to"):
        tm.forward_parts(IDS[:2], attention_mask=mask)
    additive = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    additive[0, 0, 1, :] = float("-inf")
    with pytest.raises(TaftError, match="row 0 of the batch has no token to attend to"):
        tm.forward_parts(IDS[:2], attention_mask=additive)
