"""nn.GELU rule, erf and tanh forms (``ẏ = g'(x)·ẋ``), against torch.func.jvp and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.rules.gelu import gelu_dual
from tests.helpers import assert_close
from tests.rules import _rule_harness as rh

NAME = "mlp.act"
APPROX = ["none", "tanh"]


def _ref_grad(x, approximate):
    """g'(x) by forward-mode AD of F.gelu (independent of the closed form)."""
    return torch.func.jvp(lambda a: nn.functional.gelu(a, approximate=approximate), (x,), (torch.ones_like(x),))[1]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), scale=rh.SCALES, seed=rh.SEEDS)
def test_gelu_matches_jvp(approximate, dtype, shape, layout, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, dtype, layout, scale)
    rh.check_rule(nn.GELU(approximate=approximate), NAME, {}, {}, x, xdot, elementwise=True)


@pytest.mark.parametrize("approximate", APPROX)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), seed=rh.SEEDS)
def test_gelu_no_tangent(approximate, shape, layout, seed):
    x = rh.rand(shape, rh.gen(seed), layout=layout)
    rh.check_rule_no_tangent(nn.GELU(approximate=approximate), NAME, {}, x, exact=True)


@pytest.mark.parametrize("approximate", APPROX)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, scale=rh.SCALES, seed=rh.SEEDS)
def test_gelu_finite_difference(approximate, shape, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, scale=scale)
    rh.check_rule_finite_difference(nn.GELU(approximate=approximate), NAME, {}, {}, x, xdot, elementwise=True)


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_gelu_slope_at_zero_is_exactly_half(approximate, dtype):
    x = torch.zeros(2, 3, 4, dtype=dtype)
    xdot = rh.rand(x.shape, rh.gen(0), dtype)
    out = rh.run_rule(nn.GELU(approximate=approximate), NAME, {}, {}, Dual(x, xdot))
    assert torch.equal(out.primal, torch.zeros_like(x))
    assert torch.equal(out.tangent, 0.5 * xdot)
    signed = gelu_dual(TangentContext({}, {}, vjp=False), Dual(torch.tensor([0.0, -0.0], dtype=dtype),
                                                              torch.ones(2, dtype=dtype)), approximate)
    assert torch.equal(signed.tangent, torch.tensor([0.5, 0.5], dtype=dtype))


NEAR_ZERO = [5e-324, 1e-300, 1e-45, 1e-30, 1e-12, 1e-8, 1e-6, 1e-4, 1e-2]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_gelu_near_zero(approximate, dtype):
    v = torch.tensor(NEAR_ZERO, dtype=torch.float64)
    x = torch.cat([v, -v, torch.zeros(1, dtype=torch.float64)]).to(dtype)
    xdot = torch.ones_like(x)
    out = rh.run_rule(nn.GELU(approximate=approximate), NAME, {}, {}, Dual(x, xdot))
    assert_close(out.tangent.double(), _ref_grad(x.double(), approximate), what="tangent", dtype=dtype)
    # g'(x) = ½ + x·(2φ(0)) + O(x³) for both forms (c = √(2/π) = 2φ(0)): elementwise, not just relative to max.
    lin = 0.5 + x.double() * math.sqrt(2.0 / math.pi)
    err = (out.tangent.double() - lin).abs()
    assert (err <= 1e-5 + 4 * torch.finfo(dtype).eps).all(), err.max()


LARGE = [10.0, 30.0, 100.0, 1e4, 1e8]


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_gelu_large_magnitude(approximate, dtype):
    v = torch.tensor(LARGE, dtype=dtype)
    x = torch.cat([v, -v])
    xdot = torch.full_like(x, 3.0)
    out = rh.run_rule(nn.GELU(approximate=approximate), NAME, {}, {}, Dual(x, xdot))
    assert torch.isfinite(out.tangent).all()
    assert_close(out.tangent.double(), 3.0 * _ref_grad(x.double(), approximate), what="tangent", dtype=dtype)
    # Saturation: slope 1 on the right, 0 on the left (|g'(−10)| ≈ 7.7e-22).
    n = len(LARGE)
    assert torch.equal(out.tangent[:n], xdot[:n])
    assert out.tangent[n:].abs().max() < 1e-20


@pytest.mark.parametrize("approximate", APPROX)
def test_gelu_concrete_slope_at_one(approximate):
    """g'(1): erf form Φ(1) + φ(1) = 1.0833154705876864; tanh form ≈ 1.0829640838457826."""
    expected = {"none": 1.0833154705876864, "tanh": 1.0829640838457826}[approximate]
    ref = _ref_grad(torch.ones(1, dtype=torch.float64), approximate).item()
    assert abs(ref - expected) < 1e-12, ref
    out = gelu_dual(TangentContext({}, {}, vjp=False), Dual(torch.ones(1, dtype=torch.float64),
                                                            torch.ones(1, dtype=torch.float64)), approximate)
    assert abs(out.tangent.item() - expected) < 1e-14


def test_gelu_forms_differ():
    """The two forms must not be swapped: their slopes differ by ~3.5e-4 at x = 1."""
    one = Dual(torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    erf, tanh = (gelu_dual(TangentContext({}, {}, vjp=False), one, a).tangent for a in ("none", "tanh"))
    assert abs((erf - tanh).item()) > 1e-4


@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gelu_tangent_is_finite_in_half_precision(approximate, dtype):
    """|x| up to 6e4: a written-out tanh-GELU derivative overflows x² in float16 and gives 0·inf = NaN."""
    x = torch.tensor([-6e4, -300.0, -50.0, -3.0, 0.0, 3.0, 50.0, 300.0, 6e4], dtype=dtype)
    for vjp in (False, True):
        out = gelu_dual(TangentContext({}, {}, vjp=vjp), Dual(x, torch.ones_like(x)), approximate)
        expected = gelu_dual(TangentContext({}, {}, vjp=vjp), Dual(x.double(), torch.ones_like(x.double())),
                             approximate).tangent
        assert torch.isfinite(out.tangent).all()
        assert (out.tangent.double() - expected).abs().max() < 2e-2


def test_gelu_batch1_seq1_non_contiguous_reference_nonzero():
    g = rh.gen(21)
    x = rh.rand((1, 1, 6), g, layout="strided")
    xdot = rh.rand((1, 1, 6), g, layout="strided")
    assert not x.is_contiguous()
    for approximate in APPROX:
        _, ty = rh.check_rule(nn.GELU(approximate=approximate), NAME, {}, {}, x, xdot, elementwise=True)
        assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"
