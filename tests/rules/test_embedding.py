"""nn.Embedding rule (``ẏ = Ẇ[i]``; indices carry no tangent) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.dual import Dual
from tests.rules import _rule_harness as rh

NAME = "embeddings.word_embeddings"


def make_emb(vocab, dim, padding_idx=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Embedding(vocab, dim, padding_idx=padding_idx).to(dtype)


@st.composite
def emb_case(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    vocab, dim = draw(st.integers(1, 10)), draw(st.integers(1, 8))
    pad = draw(st.one_of(st.none(), st.integers(-vocab, vocab - 1)))
    seed = draw(rh.SEEDS)
    idx = torch.randint(0, vocab, (b, t), generator=rh.gen(seed))
    if pad is not None and draw(st.booleans()):  # make sure padding positions actually occur
        idx[:, -1] = pad % vocab
    if draw(st.booleans()):
        idx = idx.t().contiguous().t()  # non-contiguous index tensor, same values
    return idx, vocab, dim, pad, seed


@pytest.mark.parametrize("dtype", rh.DTYPES)
@pytest.mark.parametrize("wrap", [True, False], ids=["dual-idx", "raw-idx"])
@rh.RULE_SETTINGS
@given(case=emb_case())
def test_embedding_matches_jvp(dtype, wrap, case):
    idx, vocab, dim, pad, seed = case
    emb = make_emb(vocab, dim, pad, dtype, seed)
    params = rh.module_params(emb, NAME)
    deltas = rh.make_deltas(params, ["weight"], rh.gen(seed + 1))
    out = rh.run_rule(emb, NAME, params, deltas, Dual(idx, None) if wrap else idx)
    ref_out, _ = rh.check_rule(emb, NAME, params, deltas, idx, differentiable_input=False)
    assert torch.equal(out.primal, ref_out.primal) and torch.equal(out.tangent, ref_out.tangent)
    # exact gather: every position is the looked-up row of Δw (padding rows included: padding_idx only
    # masks the gradient, the forward still reads W[pad])
    assert torch.equal(out.tangent, deltas[f"{NAME}.weight"][idx])


@rh.RULE_SETTINGS
@given(case=emb_case())
def test_embedding_no_tangent(case):
    idx, vocab, dim, pad, seed = case
    emb = make_emb(vocab, dim, pad, seed=seed)
    params = rh.module_params(emb, NAME)
    rh.check_rule_no_tangent(emb, NAME, params, idx, exact=True)


@rh.RULE_SETTINGS
@given(case=emb_case())
def test_embedding_finite_difference(case):
    idx, vocab, dim, pad, seed = case
    emb = make_emb(vocab, dim, pad, seed=seed)
    params = rh.module_params(emb, NAME)
    deltas = rh.make_deltas(params, ["weight"], rh.gen(seed + 1))
    rh.check_rule_finite_difference(emb, NAME, params, deltas, idx)


def test_embedding_padding_idx_concrete():
    emb = make_emb(4, 2, padding_idx=0)
    params = rh.module_params(emb, NAME)
    assert torch.equal(params[f"{NAME}.weight"][0], torch.zeros(2, dtype=torch.float64))  # nn init zeroes it
    dw = torch.arange(8, dtype=torch.float64).reshape(4, 2) + 1.0
    idx = torch.tensor([[2, 0, 3], [0, 0, 1]])
    out = rh.run_rule(emb, NAME, params, {f"{NAME}.weight": dw}, idx)
    expected = torch.tensor([[[5.0, 6.0], [1.0, 2.0], [7.0, 8.0]], [[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]],
                            dtype=torch.float64)
    assert torch.equal(out.tangent, expected)
    _, ty = rh.check_rule(emb, NAME, params, {f"{NAME}.weight": dw}, idx, differentiable_input=False)
    assert ty.abs().max() > 0, "reference tangent is zero: the check would pass vacuously"


def test_embedding_batch1_seq1():
    emb = make_emb(5, 3, seed=2)
    params = rh.module_params(emb, NAME)
    deltas = rh.make_deltas(params, ["weight"], rh.gen(2))
    _, ty = rh.check_rule(emb, NAME, params, deltas, torch.tensor([[4]]), differentiable_input=False)
    assert ty.shape == (1, 1, 3) and ty.abs().max() > 0


def test_embedding_max_norm_not_supported():
    emb = nn.Embedding(4, 2, max_norm=1.0).double()
    params = rh.module_params(emb, NAME)
    with pytest.raises(NotImplementedError):
        rh.run_rule(emb, NAME, params, {f"{NAME}.weight": torch.ones(4, 2, dtype=torch.float64)}, torch.tensor([1]))
