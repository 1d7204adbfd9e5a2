"""Softmax attention core (``attention_dual``) and ``additive_mask`` against torch.func.jvp of plain attention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.rules.attention import additive_mask, attention_dual
from tests.helpers import assert_close
from tests.rules._rule_harness import RULE_SETTINGS, assert_close_scaled, check_finite_difference, gen, rand

SLOTS = ("q", "k", "v")


def plain_attention(q, k, v, scale, mask=None):
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1) @ v


def _ctx():
    return TangentContext({}, {}, vjp=False)


@st.composite
def attn_case(draw):
    b, h = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    t, s, d = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    masked = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    keep = None
    if masked:
        keep = (torch.rand(b, s, generator=gen(seed + 7)) < 0.6).long()
        keep[:, draw(st.integers(0, s - 1))] = 1  # every row keeps at least one key
    layout = draw(st.sampled_from(["contiguous", "transposed"]))
    return (b, h, t, s, d), keep, seed, layout


def make_qkv(shape, g, dtype, layout="contiguous"):
    b, h, t, s, d = shape
    if layout == "transposed":  # (B, T, h, d) buffers viewed as (B, h, T, d): how heads are split in models
        q = rand((b, t, h, d), g, dtype).transpose(1, 2)
        k = rand((b, s, h, d), g, dtype).transpose(1, 2)
        v = rand((b, s, h, d), g, dtype).transpose(1, 2)
    else:
        q, k, v = rand((b, h, t, d), g, dtype), rand((b, h, s, d), g, dtype), rand((b, h, s, d), g, dtype)
    return q, k, v


def cancellation_scale(q, k, v, tq, tk, tv, scale, mask) -> float:
    """max of Σ|terms| of Ȯ = (P⊙Ṡ)V − rowsum(P⊙Ṡ)·O + PV̇ (float64).

    When P is nearly one-hot (or a row has a single unmasked key) the two softmax terms cancel and Ȯ is
    orders of magnitude below them; a float32 sum then carries an error of ~eps·Σ|terms| whatever the
    formulation (PyTorch's own float32 jvp of softmax attention included), so that is the yardstick."""
    q, k, v = q.double(), k.double(), v.double()
    zero = torch.zeros_like
    tq, tk, tv = (zero(a) if t is None else t.double() for a, t in ((q, tq), (k, tk), (v, tv)))
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s + mask.double()
    p = torch.softmax(s, -1)
    pds = (p * (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1)) * scale).abs()
    terms = pds @ v.abs() + pds.sum(-1, keepdim=True) * (p @ v).abs() + p @ tv.abs()
    return terms.max().item()


def run_case(shape, keep, seed, layout, dtype, slots):
    """(rule Dual, reference (y, ẏ) in float64, cancellation scale) with tangents on ``slots``."""
    g = gen(seed)
    q, k, v = make_qkv(shape, g, dtype, layout)
    tq, tk, tv = (rand(a.shape, g, dtype) if n in slots else None for n, a in zip(SLOTS, (q, k, v), strict=True))
    scale = 1.0 / math.sqrt(shape[-1])
    mask = additive_mask(keep, dtype)
    out = attention_dual(_ctx(), Dual(q, tq), Dual(k, tk), Dual(v, tv), scale=scale, mask=mask)

    def z(a, t):
        return torch.zeros_like(a, dtype=torch.float64) if t is None else t.double()

    ref = torch.func.jvp(
        lambda a, b, c: plain_attention(a, b, c, scale, None if mask is None else mask.double()),
        (q.double(), k.double(), v.double()),
        (z(q, tq), z(k, tk), z(v, tv)),
    )
    return out, ref, cancellation_scale(q, k, v, tq, tk, tv, scale, mask)


TANGENT_SETS = [("q",), ("k",), ("v",), ("q", "k"), ("q", "k", "v")]


@pytest.mark.parametrize("slots", TANGENT_SETS, ids=["+".join(s) for s in TANGENT_SETS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@RULE_SETTINGS
@given(case=attn_case())
def test_attention_matches_jvp(slots, dtype, case):
    shape, keep, seed, layout = case
    out, (y, ty), floor = run_case(shape, keep, seed, layout, dtype, slots)
    b, h, t, s, d = shape
    assert out.primal.shape == out.tangent.shape == (b, h, t, d)
    assert out.primal.dtype == out.tangent.dtype == dtype
    assert_close(out.primal.double(), y, what="primal", dtype=dtype)
    if dtype == torch.float64:
        assert_close(out.tangent, ty, what="tangent")
    else:
        assert_close_scaled(out.tangent.double(), ty, what="tangent", dtype=dtype, floor=floor)


@RULE_SETTINGS
@given(case=attn_case())
def test_attention_no_tangent(case):
    shape, keep, seed, layout = case
    out, (y, ty), _ = run_case(shape, keep, seed, layout, torch.float64, ())
    assert out.tangent is None
    assert not ty.any()
    assert_close(out.primal, y, what="primal")


@RULE_SETTINGS
@given(case=attn_case())
def test_attention_finite_difference(case):
    shape, keep, seed, layout = case
    g = gen(seed)
    q, k, v = make_qkv(shape, g, torch.float64, layout)
    tq, tk, tv = rand(q.shape, g), rand(k.shape, g), rand(v.shape, g)
    scale = 1.0 / math.sqrt(shape[-1])
    mask = additive_mask(keep, torch.float64)
    out = attention_dual(_ctx(), Dual(q, tq), Dual(k, tk), Dual(v, tv), scale=scale, mask=mask)
    eps = 1e-6

    def at(sgn):
        return plain_attention(q + sgn * eps * tq, k + sgn * eps * tk, v + sgn * eps * tv, scale, mask)

    check_finite_difference(out.tangent, (at(1.0) - at(-1.0)) / (2 * eps))


def test_attention_reference_nonzero_with_padding_and_t_ne_s():
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    out, (y, ty), _ = run_case((2, 2, 3, 5, 4), keep, 71, "contiguous", torch.float64, SLOTS)
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")


def test_attention_single_key_has_no_softmax_tangent():
    """S = 1 (or one unmasked key): P ≡ 1, so Ȯ = V̇ exactly and q̇, k̇ have no effect."""
    g = gen(72)
    q, k, v = rand((2, 2, 3, 4), g), rand((2, 2, 1, 4), g), rand((2, 2, 1, 4), g)
    tq, tk, tv = rand(q.shape, g), rand(k.shape, g), rand(v.shape, g)
    out = attention_dual(_ctx(), Dual(q, tq), Dual(k, tk), Dual(v, tv), scale=0.5)
    assert torch.equal(out.primal, v.expand(2, 2, 3, 4))
    assert (out.tangent - tv.expand(2, 2, 3, 4)).abs().max() < 1e-15


def test_attention_concrete_two_keys():
    """T = S = 2, d = 1, q = 1, k = (0, 1), v = (0, 1), scale 1: P = softmax(0, 1), O = σ(1);
    q̇ = 1 moves the logit gap by k₁ − k₀ = 1, so Ȯ = σ'(1) = σ(1)(1 − σ(1))."""
    f64 = torch.float64
    q = torch.ones(1, 1, 1, 1, dtype=f64)
    k = torch.tensor([0.0, 1.0], dtype=f64).reshape(1, 1, 2, 1)
    v = k.clone()
    out = attention_dual(_ctx(), Dual(q, torch.ones_like(q)), Dual(k), Dual(v), scale=1.0)
    sig = 1.0 / (1.0 + math.exp(-1.0))
    assert abs(out.primal.item() - sig) < 1e-15
    assert abs(out.tangent.item() - sig * (1 - sig)) < 1e-15


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_keys_have_exactly_zero_influence(dtype):
    """Changing k, v, k̇, v̇ at padded key positions changes neither primal nor tangent (bit-exact)."""
    b, h, t, s, d = 3, 2, 4, 6, 5
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 1, 0, 1, 0], [1, 1, 1, 1, 1, 0]])
    g = gen(73)
    q, k, v = make_qkv((b, h, t, s, d), g, dtype)
    tq, tk, tv = rand(q.shape, g, dtype), rand(k.shape, g, dtype), rand(v.shape, g, dtype)
    mask = additive_mask(keep, dtype)
    scale = 1.0 / math.sqrt(d)
    a = attention_dual(_ctx(), Dual(q, tq), Dual(k, tk), Dual(v, tv), scale=scale, mask=mask)

    padded = (keep == 0)[:, None, :, None]  # (B, 1, S, 1)

    def scramble(x, seed):
        noise = 100.0 * torch.randn(x.shape, generator=gen(seed), dtype=dtype)
        return torch.where(padded, noise, x)

    k2, v2, tk2, tv2 = scramble(k, 1), scramble(v, 2), scramble(tk, 3), scramble(tv, 4)
    assert not torch.equal(k2, k) and not torch.equal(tv2, tv)
    bb = attention_dual(_ctx(), Dual(q, tq), Dual(k2, tk2), Dual(v2, tv2), scale=scale, mask=mask)
    assert torch.equal(a.primal, bb.primal)
    assert torch.equal(a.tangent, bb.tangent)
    assert a.tangent.abs().max() > 0.1
    # and the kept keys do matter
    k3 = torch.where(padded, k, k + 1.0)
    c = attention_dual(_ctx(), Dual(q, tq), Dual(k3, tk), Dual(v, tv), scale=scale, mask=mask)
    assert not torch.equal(a.tangent, c.tangent)


def test_masked_attention_equals_attention_over_kept_keys_only():
    """A row of padded keys is the same as dropping those keys: compare against the truncated problem."""
    g = gen(74)
    q, k, v = make_qkv((1, 2, 3, 5, 4), g, torch.float64)
    tq, tk, tv = rand(q.shape, g), rand(k.shape, g), rand(v.shape, g)
    keep = torch.tensor([[1, 0, 1, 1, 0]])
    idx = keep[0].nonzero().squeeze(1)
    full = attention_dual(_ctx(), Dual(q, tq), Dual(k, tk), Dual(v, tv), scale=0.5,
                          mask=additive_mask(keep, torch.float64))
    kept = attention_dual(_ctx(), Dual(q, tq), Dual(k[:, :, idx], tk[:, :, idx]), Dual(v[:, :, idx], tv[:, :, idx]),
                          scale=0.5)
    assert_close(full.primal, kept.primal, what="primal")
    assert_close(full.tangent, kept.tangent, what="tangent")


def test_attention_with_4d_mask_broadcast_over_queries():
    """A (B, 1, T, S) additive mask (e.g. causal) with T != S."""
    g = gen(75)
    q, k, v = make_qkv((2, 2, 3, 4, 4), g, torch.float64)
    tq, tk, tv = rand(q.shape, g), rand(k.shape, g), rand(v.shape, g)
    allowed = torch.ones(3, 4, dtype=torch.bool).tril(diagonal=1)[None, None].expand(2, 1, 3, 4)
    mask = additive_mask(allowed, torch.float64)
    assert mask.shape == (2, 1, 3, 4) and mask.dtype == torch.float64
    out = attention_dual(_ctx(), Dual(q, tq), Dual(k, tk), Dual(v, tv), scale=0.5, mask=mask)
    y, ty = torch.func.jvp(lambda a, b, c: plain_attention(a, b, c, 0.5, mask), (q, k, v), (tq, tk, tv))
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")


def test_additive_mask_values():
    keep = torch.tensor([[1, 0, 1], [0, 1, 1]])
    for dtype in (torch.float64, torch.float32):
        m = additive_mask(keep, dtype)
        assert m.shape == (2, 1, 1, 3) and m.dtype == dtype
        lo = torch.finfo(dtype).min
        expected = torch.tensor([[0.0, lo, 0.0], [lo, 0.0, 0.0]], dtype=dtype)[:, None, None, :]
        assert torch.equal(m, expected)
    assert additive_mask(None, torch.float32) is None
    four = torch.full((1, 1, 2, 2), -5.0, dtype=torch.float64)
    assert torch.equal(additive_mask(four, torch.float32), four.float())


@pytest.mark.parametrize("vjp", [True, False], ids=["vjp-with-grad", "closed-form"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unfused_low_precision_tangent_is_accumulated_in_float32(dtype, vjp):
    """On the unfused path (CPU) a bf16/fp16 attention's tangent is the float32 computation on the same rounded
    inputs, rounded once: within half an ulp of the float64 value, where low-precision intermediates are not."""
    g = gen(3)
    B, h, T, d = 2, 2, 96, 16
    q, k, v = (3 * rand((B, h, T, d), g, torch.float64) for _ in range(3))  # peaked rows, long sums
    tq, tk, tv = (rand((B, h, T, d), g, torch.float64) for _ in range(3))
    low = [t.to(dtype) for t in (q, k, v, tq, tk, tv)]
    exact = [t.to(torch.float64) for t in low]  # the rounded inputs, computed exactly
    scale = d ** -0.5
    ref = attention_dual(_ctx(), *(Dual(exact[i], exact[i + 3]) for i in range(3)), scale=scale).tangent
    ctx = TangentContext({}, {}, vjp=vjp)
    qd = Dual(low[0].requires_grad_(vjp), low[3])
    with torch.set_grad_enabled(vjp):
        out = attention_dual(ctx, qd, Dual(low[1], low[4]), Dual(low[2], low[5]), scale=scale).tangent
    assert out.dtype == dtype
    err = (out.double() - ref).abs()
    # one rounding of the result: |err| ≤ half an ulp of |ref| (+ a float32-accumulation allowance)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool((err <= 0.5 * ulp + 1e-5 * ref.abs().max()).all()), float((err / ulp).max())
