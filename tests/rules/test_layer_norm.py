"""nn.LayerNorm rule (``ẏ = γ/σ·(ẋ − mean ẋ − x̂·mean(x̂ẋ)) + γ̇x̂ + β̇``) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.dual import Dual
from taft.rules.layer_norm import layer_norm_dual
from tests.helpers import assert_close
from tests.rules import _rule_harness as rh

NAME = "blk.ln"

# (elementwise_affine, bias): full, no bias (γ only), no affine at all.
AFFINE = [(True, True), (True, False), (False, False)]


def make_ln(d, affine, bias, dtype=torch.float64, seed=0, eps=1e-5):
    ln = nn.LayerNorm(d, eps=eps, elementwise_affine=affine, bias=bias).to(dtype)
    if affine:  # non-trivial γ, β (default init is 1, 0)
        g = rh.gen(seed + 1)
        with torch.no_grad():
            ln.weight.copy_(1.0 + 0.5 * torch.randn(d, generator=g, dtype=dtype))
            if ln.bias is not None:
                ln.bias.copy_(torch.randn(d, generator=g, dtype=dtype))
    return ln


# D ≥ 3: at D = 2 the row is normalized to ±1 and the input tangent is O(ε/var), i.e. pure cancellation
# (a relative check would only measure rounding); D = 1 and D = 2 have their own tests below.
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(3, 8))


def _param_names(ln):
    return [k for k, _ in ln.named_parameters()]


# Without elementwise_affine there is nothing to linearize: only the input-tangent case applies.
CASES = [(a, b, c) for a, b in AFFINE for c in ("input", "param", "both") if a or c == "input"]


@pytest.mark.parametrize("dtype", rh.DTYPES)
@pytest.mark.parametrize("affine,bias,case", CASES)
@rh.RULE_SETTINGS
@given(shape=shapes, layout=st.sampled_from(rh.LAYOUTS), subset=st.integers(0, 2), seed=rh.SEEDS)
def test_layer_norm_matches_jvp(case, dtype, affine, bias, shape, layout, subset, seed):
    b, t, d = shape
    g = rh.gen(seed)
    ln = make_ln(d, affine, bias, dtype, seed)
    x = rh.rand((b, t, d), g, dtype, layout, scale=2.0) + 0.5
    params = rh.module_params(ln, NAME)
    names = _param_names(ln)
    if case in ("param", "both"):
        which = [names[subset % len(names)]] if subset < 2 else names
        deltas = rh.make_deltas(params, which, g)
    else:
        deltas = {}
    xdot = rh.rand(x.shape, g, dtype) if case in ("input", "both") else None
    rh.check_rule(ln, NAME, params, deltas, x, xdot)


@pytest.mark.parametrize("affine,bias", AFFINE)
@rh.RULE_SETTINGS
@given(shape=shapes, layout=st.sampled_from(rh.LAYOUTS), seed=rh.SEEDS)
def test_layer_norm_no_tangent(affine, bias, shape, layout, seed):
    b, t, d = shape
    g = rh.gen(seed)
    ln = make_ln(d, affine, bias, seed=seed)
    x = rh.rand((b, t, d), g, layout=layout)
    params = rh.module_params(ln, NAME)
    rh.check_rule_no_tangent(ln, NAME, params, x, exact=False)


@pytest.mark.parametrize("affine,bias", AFFINE)
@rh.RULE_SETTINGS
@given(shape=shapes, seed=rh.SEEDS)
def test_layer_norm_finite_difference(affine, bias, shape, seed):
    b, t, d = shape
    g = rh.gen(seed)
    ln = make_ln(d, affine, bias, seed=seed)
    x = rh.rand((b, t, d), g)
    rh.check_full_finite_difference(ln, NAME, x, g)


def test_layer_norm_batch1_seq1_reference_nonzero():
    g = rh.gen(11)
    ln = make_ln(7, True, True, seed=11)
    x = rh.rand((1, 1, 7), g)
    params = rh.module_params(ln, NAME)
    deltas = rh.make_deltas(params, ["weight", "bias"], g)
    _, ty = rh.check_rule(ln, NAME, params, deltas, x, rh.rand(x.shape, g))
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"


def test_layer_norm_input_tangent_is_orthogonal_to_shift_and_scale():
    """Concrete property of the normalization: ẋ = c (a shift) and ẋ = c·x (a scale, no affine) give ẏ = 0."""
    g = rh.gen(12)
    ln = make_ln(6, True, True, seed=12)
    x = rh.rand((2, 3, 6), g) + 1.0
    params = rh.module_params(ln, NAME)
    shift = rh.run_rule(ln, NAME, params, {}, Dual(x, torch.full_like(x, 3.0)))
    assert shift.tangent.abs().max() < 1e-12
    ln0 = make_ln(6, False, False)
    xc = x - x.mean(-1, keepdim=True)  # centred: scaling it changes only σ, so ẏ = 0 up to the ε term
    scale = rh.run_rule(ln0, NAME, {}, {}, Dual(xc, 2.0 * xc))
    # d/dt LN(x(1+2t)) = x̂·(ε/(var+ε))·2 ≈ 0: tiny but not exactly zero.
    var = xc.pow(2).mean(-1, keepdim=True)
    expected = 2.0 * (xc * torch.rsqrt(var + ln0.eps)) * ln0.eps / (var + ln0.eps)
    assert_close(scale.tangent, expected, what="scale tangent")


def test_layer_norm_non_contiguous_inputs():
    rh.check_non_contiguous(make_ln(5, True, True, seed=13), NAME, (3, 4, 5), seed=13)


def test_layer_norm_width_one():
    """D = 1: x̂ ≡ 0, so y = β and the input/γ tangents vanish; only β̇ survives."""
    g = rh.gen(14)
    ln = make_ln(1, True, True, seed=14)
    x = rh.rand((2, 3, 1), g)
    params = rh.module_params(ln, NAME)
    deltas = rh.make_deltas(params, ["weight", "bias"], g)
    out = rh.run_rule(ln, NAME, params, deltas, Dual(x, rh.rand(x.shape, g)))
    assert torch.equal(out.tangent, deltas[f"{NAME}.bias"].expand(2, 3, 1))
    rh.check_rule(ln, NAME, params, deltas, x, rh.rand(x.shape, g))


def test_layer_norm_width_two():
    """D = 2: x̂ = ±√(var/(var+ε)), so ẋ moves y only through ε: ẏ = γ·ε/(var+ε)^{3/2}·(ẋ − mean ẋ)/… is
    tiny. Checked against the reference with an absolute bound on the scale of the terms that cancel."""
    g = rh.gen(17)
    ln = make_ln(2, True, True, seed=17)
    x = rh.rand((3, 4, 2), g)
    xdot = rh.rand(x.shape, g)
    params = rh.module_params(ln, NAME)
    out = rh.run_rule(ln, NAME, params, {}, Dual(x, xdot))
    _, ty = torch.func.jvp(lambda a: ln(a), (x,), (xdot,))
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    scale = (rstd * xdot.abs().amax(-1, keepdim=True) * ln.weight.abs().max()).max()
    assert (out.tangent - ty).abs().max() <= 1e-13 * scale
    # exact form for D = 2: with h = (x₀ − x₁)/2, ẏ₀ = γ₀·ε·(ẋ₀ − ẋ₁)/2 / (h² + ε)^{3/2}
    h = (x[..., 0] - x[..., 1]) / 2
    t0 = ln.weight[0].detach() * ln.eps * (xdot[..., 0] - xdot[..., 1]) / 2 / (h.pow(2) + ln.eps).pow(1.5)
    assert_close(out.tangent[..., 0], t0, what="D=2 closed form")


def test_layer_norm_eps_is_respected():
    """A large ε changes the tangent; the rule must use the module's ε, not a default."""
    g = rh.gen(15)
    x = rh.rand((2, 2, 4), g) * 0.1
    xdot = rh.rand(x.shape, g)
    for eps in (1e-12, 1e-1):
        ln = make_ln(4, False, False, eps=eps)
        rh.check_rule(ln, NAME, {}, {}, x, xdot)


def test_layer_norm_dual_functional_form():
    """layer_norm_dual without γ/β equals F.layer_norm's jvp (the form shared with fused callers)."""
    from taft.engine.context import TangentContext

    g = rh.gen(16)
    x, xdot = rh.rand((2, 3, 5), g), rh.rand((2, 3, 5), g)
    out = layer_norm_dual(TangentContext({}, {}, vjp=False), Dual(x, xdot), None, None, 1e-6)
    y, ty = torch.func.jvp(lambda a: torch.nn.functional.layer_norm(a, (5,), eps=1e-6), (x,), (xdot,))
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")


def test_layer_norm_multi_dim_normalized_shape_not_supported():
    ln = nn.LayerNorm((2, 3)).double()
    params = rh.module_params(ln, NAME)
    x = torch.zeros(1, 2, 3, dtype=torch.float64)
    with pytest.raises(NotImplementedError):
        rh.run_rule(ln, NAME, params, {}, Dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("vjp", [False, True])
def test_layer_norm_bias_without_weight(vjp):
    """``layer_norm_dual`` with β but no γ (functional callers): ẏ = (ẋ − mean ẋ − x̂·mean(x̂ẋ))/σ + β̇."""
    from taft.engine.context import TangentContext

    g = rh.gen(21)
    x, xdot, b, bdot = (rh.rand(s, g) for s in ((2, 3, 5), (2, 3, 5), (5,), (5,)))
    with torch.no_grad():
        out = layer_norm_dual(TangentContext({}, {}, vjp=vjp), Dual(x, xdot), None, Dual(b, bdot), 1e-5)
    y, ty = torch.func.jvp(lambda x, b: torch.nn.functional.layer_norm(x, (5,), None, b, 1e-5), (x, b), (xdot, bdot))
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")
