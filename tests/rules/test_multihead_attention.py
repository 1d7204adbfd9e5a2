"""nn.MultiheadAttention rule against torch.func.jvp of the module's own forward (float64)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import taft.rules  # noqa: F401  (registers the rules)
from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from tests.helpers import assert_close


@pytest.fixture(autouse=True)
def no_mha_fastpath():
    # torch's fused MHA fast path (eval, batch_first, self-attention) has no forward-mode derivative, so the
    # torch.func.jvp reference needs the slow path (same maths).
    # Tiny float64 GEMMs: thread wake-ups dominate on a 2-core machine, so one thread.
    prev, n = torch.backends.mha.get_fastpath_enabled(), torch.get_num_threads()
    torch.backends.mha.set_fastpath_enabled(False)
    torch.set_num_threads(1)
    yield
    torch.backends.mha.set_fastpath_enabled(prev)
    torch.set_num_threads(n)


def make_mha(E=8, h=2, seed=0, **kw) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, h, **kw).double().eval()
    with torch.no_grad():
        for p in m.parameters():  # non-zero biases so every term of the rule is exercised
            p.add_(0.1 * torch.randn_like(p))
    return m


def check_rule(m, q, k=None, v=None, *, self_attn=True, seed=1, **kw):
    """Rule (all parameters and the inputs carry tangents) vs torch.func.jvp over functional_call."""
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach() for n, p in m.named_parameters()}
    dparams = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    if self_attn:
        k = v = q
    xs = [q] if self_attn else [q, k, v]
    dxs = [torch.randn(x.shape, generator=g, dtype=x.dtype) for x in xs]

    def f(w, *inp):
        a = (inp[0], inp[0], inp[0]) if self_attn else inp
        return torch.func.functional_call(m, w, a, kw)[0]

    with sdpa_kernel(SDPBackend.MATH):
        y, ty = torch.func.jvp(f, (params, *xs), (dparams, *dxs))

    ctx = TangentContext({f"mha.{n}": p for n, p in params.items()},
                         {f"mha.{n}": d for n, d in dparams.items()}, vjp=False)
    duals = [Dual(x, dx) for x, dx in zip(xs, dxs, strict=True)]
    args = (duals[0], duals[0], duals[0]) if self_attn else tuple(duals)
    out = ctx.call(m, "mha", *args, **kw)
    assert ctx.fallback_modules == []
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")
    assert ty.abs().max() > 0


def padding_mask(N, S, g, as_bool=True):
    lens = torch.randint(1, S + 1, (N,), generator=g)
    pad = torch.arange(S)[None, :] >= lens[:, None]  # True = padded (ignored)
    if as_bool:
        return pad
    return torch.zeros(N, S, dtype=torch.float64).masked_fill(pad, float("-inf"))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_with_key_padding_mask(batch_first, need_weights):
    m = make_mha(batch_first=batch_first)
    g = torch.Generator().manual_seed(0)
    N, L = 3, 5
    x = torch.randn((N, L, 8) if batch_first else (L, N, 8), generator=g, dtype=torch.float64)
    kpm = padding_mask(N, L, g)
    check_rule(m, x, key_padding_mask=kpm, need_weights=need_weights)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_attn_mask_and_float_padding(batch_first):
    m = make_mha(batch_first=batch_first)
    g = torch.Generator().manual_seed(1)
    N, L, S = 2, 4, 6
    shape = (lambda T: (N, T, 8)) if batch_first else (lambda T: (T, N, 8))
    q = torch.randn(shape(L), generator=g, dtype=torch.float64)
    k = torch.randn(shape(S), generator=g, dtype=torch.float64)
    v = torch.randn(shape(S), generator=g, dtype=torch.float64)
    am = torch.randn(L, S, generator=g, dtype=torch.float64)
    kpm = padding_mask(N, S, g, as_bool=False)
    check_rule(m, q, k, v, self_attn=False, attn_mask=am, key_padding_mask=kpm, need_weights=False)


def test_3d_bool_attn_mask_and_causal():
    m = make_mha(batch_first=True)
    g = torch.Generator().manual_seed(2)
    N, L = 2, 5
    x = torch.randn(N, L, 8, generator=g, dtype=torch.float64)
    am3 = torch.rand(N * 2, L, L, generator=g) > 0.6
    am3[..., 0] = False  # every query attends at least one key
    check_rule(m, x, attn_mask=am3)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    check_rule(m, x, attn_mask=causal, is_causal=True, need_weights=False)
    check_rule(m, x, attn_mask=causal, is_causal=True, need_weights=True)


def test_separate_projections_bias_kv_zero_attn_unbatched():
    m = make_mha(E=8, h=2, kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64)  # unbatched (L, E)
    k = torch.randn(6, 6, generator=g, dtype=torch.float64)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64)
    check_rule(m, q, k, v, self_attn=False, key_padding_mask=torch.tensor([False] * 5 + [True]))


def test_no_bias():
    m = make_mha(bias=False, batch_first=True)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    check_rule(m, x)


def test_training_dropout_not_supported():
    m = make_mha(dropout=0.1, batch_first=True).train()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dropout"):
        check_rule(m, x)


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 6), batch_first=st.booleans(), seed=st.integers(0, 2**16))
def test_shapes_drawn(batch, seq, batch_first, seed):
    m = make_mha(batch_first=batch_first, seed=seed % 7)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, seq, 8) if batch_first else (seq, batch, 8)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    check_rule(m, x, key_padding_mask=padding_mask(batch, seq, g), need_weights=False, seed=seed)


def test_plain_shortcut_returns_output_tensor():
    """No tangent in and nothing linearized: the module runs as is and the rule's plain_output picks out[0]."""
    m = make_mha(batch_first=True)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    ctx = TangentContext({f"mha.{n}": p.detach() for n, p in m.named_parameters()}, {}, vjp=False)
    out = ctx.call(m, "mha", Dual(x), Dual(x), Dual(x), need_weights=False)
    assert out.tangent is None
    with torch.no_grad():
        assert_close(out.primal, m(x, x, x, need_weights=False)[0], what="primal")
