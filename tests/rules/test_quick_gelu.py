"""QuickGELU closed form (``g = x·σ(1.702x)``, ``g' = s + 1.702·x·s(1 − s)``) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.rules.quick_gelu import quick_gelu_dual
from tests.helpers import assert_close
from tests.rules._rule_harness import LAYOUTS, RULE_SETTINGS, check_finite_difference, gen, rand

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 8))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _dual(x, xdot):
    return quick_gelu_dual(TangentContext({}, {}, vjp=False), Dual(x, xdot))


def _ref(x, xdot):
    return torch.func.jvp(quick_gelu, (x,), (xdot,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@RULE_SETTINGS
@given(shape=shapes, layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([0.1, 1.0, 4.0]),
       seed=st.integers(0, 2**31 - 1))
def test_quick_gelu_matches_jvp(dtype, shape, layout, scale, seed):
    g = gen(seed)
    x, xdot = rand(shape, g, dtype, layout, scale), rand(shape, g, dtype, layout)
    out = _dual(x, xdot)
    y, ty = _ref(x.double(), xdot.double())
    assert out.primal.dtype == dtype and out.tangent.dtype == dtype
    assert_close(out.primal.double(), y, what="primal", dtype=dtype)
    assert_close(out.tangent.double(), ty, what="tangent", dtype=dtype)


@RULE_SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_quick_gelu_no_tangent(shape, seed):
    x = rand(shape, gen(seed))
    out = _dual(x, None)
    assert out.tangent is None
    assert_close(out.primal, quick_gelu(x), what="primal")


@RULE_SETTINGS
@given(shape=shapes, scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_quick_gelu_finite_difference(shape, scale, seed):
    g = gen(seed)
    x, xdot = rand(shape, g, scale=scale), rand(shape, g)
    eps = 1e-6
    fd = (quick_gelu(x + eps * xdot) - quick_gelu(x - eps * xdot)) / (2 * eps)
    check_finite_difference(_dual(x, xdot).tangent, fd)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quick_gelu_at_zero_and_concrete_value(dtype):
    x = torch.tensor([0.0, 1.0], dtype=dtype)
    out = _dual(x, torch.ones_like(x))
    assert out.tangent[0].item() == 0.5  # σ(0) = ½ exactly, the second term vanishes
    s = 1.0 / (1.0 + torch.exp(torch.tensor(-1.702, dtype=torch.float64)))
    expected = (s + 1.702 * s * (1 - s)).item()  # 1.06778... at x = 1
    assert abs(expected - 1.0677796) < 1e-7
    assert abs(out.tangent[1].item() - expected) <= 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quick_gelu_large_magnitude(dtype):
    v = torch.tensor([10.0, 30.0, 100.0, 1e4, 1e8], dtype=dtype)
    x = torch.cat([v, -v])
    xdot = torch.full_like(x, -2.0)
    out = _dual(x, xdot)
    assert torch.isfinite(out.tangent).all()
    _, ty = _ref(x.double(), xdot.double())
    assert_close(out.tangent.double(), ty, what="tangent", dtype=dtype)
    assert out.tangent[5:].abs().max() < 2e-6  # |g'(−10)| ≈ 6.5e-7, then ≈ 0
    assert torch.equal(out.tangent[1:5], xdot[1:5])  # s = 1 and s(1 − s) = 0 in floating point


def test_quick_gelu_batch1_seq1_non_contiguous_reference_nonzero():
    g = gen(31)
    x, xdot = rand((1, 1, 5), g, layout="strided"), rand((1, 1, 5), g, layout="strided")
    assert not x.is_contiguous()
    out = _dual(x, xdot)
    y, ty = _ref(x, xdot)
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")
