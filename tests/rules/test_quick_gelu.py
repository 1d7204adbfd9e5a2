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
from tests.rules import _rule_harness as rh


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _dual(x, xdot):
    return quick_gelu_dual(TangentContext({}, {}, vjp=False), Dual(x, xdot))


def _ref(x, xdot):
    return torch.func.jvp(quick_gelu, (x,), (xdot,))


@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), scale=rh.SCALES, seed=rh.SEEDS)
def test_quick_gelu_matches_jvp(dtype, shape, layout, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, dtype, layout, scale)
    out = _dual(x, xdot)
    y, ty = _ref(x.double(), xdot.double())
    assert out.primal.dtype == dtype and out.tangent.dtype == dtype
    assert_close(out.primal.double(), y, what="primal", dtype=dtype)
    assert_close(out.tangent.double(), ty, what="tangent", dtype=dtype)


@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, seed=rh.SEEDS)
def test_quick_gelu_no_tangent(shape, seed):
    x = rh.rand(shape, rh.gen(seed))
    out = _dual(x, None)
    assert out.tangent is None
    assert_close(out.primal, quick_gelu(x), what="primal")


@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, scale=rh.SCALES, seed=rh.SEEDS)
def test_quick_gelu_finite_difference(shape, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, scale=scale)
    eps = 1e-6
    fd = (quick_gelu(x + eps * xdot) - quick_gelu(x - eps * xdot)) / (2 * eps)
    rh.check_finite_difference(_dual(x, xdot).tangent, fd)


@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_quick_gelu_at_zero_and_concrete_value(dtype):
    x = torch.tensor([0.0, 1.0], dtype=dtype)
    out = _dual(x, torch.ones_like(x))
    assert out.tangent[0].item() == 0.5  # σ(0) = ½ exactly, the second term vanishes
    s = 1.0 / (1.0 + torch.exp(torch.tensor(-1.702, dtype=torch.float64)))
    expected = (s + 1.702 * s * (1 - s)).item()  # 1.06778... at x = 1
    assert abs(expected - 1.0677796) < 1e-7
    assert abs(out.tangent[1].item() - expected) <= 4 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", rh.DTYPES)
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
    g = rh.gen(31)
    x, xdot = rh.rand((1, 1, 5), g, layout="strided"), rh.rand((1, 1, 5), g, layout="strided")
    assert not x.is_contiguous()
    out = _dual(x, xdot)
    y, ty = _ref(x, xdot)
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"
    assert_close(out.primal, y, what="primal")
    assert_close(out.tangent, ty, what="tangent")
