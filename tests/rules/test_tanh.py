"""nn.Tanh rule (``ẏ = (1 − y²)·ẋ``) against torch.func.jvp and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.dual import Dual
from tests.helpers import assert_close
from tests.rules._rule_harness import (
    LAYOUTS,
    RULE_SETTINGS,
    check_finite_difference,
    check_no_tangent,
    check_rule,
    direct_rule,
    finite_difference,
    gen,
    rand,
    run_rule,
)

NAME = "pooler.activation"
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@RULE_SETTINGS
@given(shape=shapes, layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([0.1, 1.0, 4.0]),
       seed=st.integers(0, 2**31 - 1))
def test_tanh_matches_jvp(dtype, shape, layout, scale, seed):
    g = gen(seed)
    x, xdot = rand(shape, g, dtype, layout, scale), rand(shape, g, dtype, layout)
    check_rule(nn.Tanh(), NAME, {}, {}, x, xdot, elementwise=True)


@RULE_SETTINGS
@given(shape=shapes, layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31 - 1))
def test_tanh_no_tangent(shape, layout, seed):
    x = rand(shape, gen(seed), layout=layout)
    check_no_tangent(nn.Tanh(), NAME, {}, x)
    out = direct_rule(nn.Tanh(), NAME, {}, Dual(x, None))
    assert out.tangent is None
    assert torch.equal(out.primal, torch.tanh(x))


@RULE_SETTINGS
@given(shape=shapes, scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_tanh_finite_difference(shape, scale, seed):
    g = gen(seed)
    x, xdot = rand(shape, g, scale=scale), rand(shape, g)
    out = run_rule(nn.Tanh(), NAME, {}, {}, Dual(x, xdot))
    check_finite_difference(out.tangent, finite_difference(nn.Tanh(), NAME, {}, {}, x, xdot),
                            floor=xdot.abs().max().item())


def test_tanh_concrete_values():
    x = torch.tensor([0.0, 1.0, -30.0, 1e4], dtype=torch.float64)
    xdot = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out = run_rule(nn.Tanh(), NAME, {}, {}, Dual(x, xdot))
    assert out.tangent[0].item() == 2.0
    assert abs(out.tangent[1].item() - 1.0 / math.cosh(1.0) ** 2) < 1e-15  # sech²(1) = 0.41997...
    assert out.tangent[2].item() == 0.0 and out.tangent[3].item() == 0.0  # saturated


def test_tanh_batch1_seq1_non_contiguous_reference_nonzero():
    g = gen(41)
    x, xdot = rand((1, 1, 4), g, layout="strided"), rand((1, 1, 4), g, layout="strided")
    assert not x.is_contiguous()
    _, ty = check_rule(nn.Tanh(), NAME, {}, {}, x, xdot, elementwise=True)
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"
    assert_close(run_rule(nn.Tanh(), NAME, {}, {}, Dual(x, xdot)).tangent, (1 - torch.tanh(x) ** 2) * xdot,
                 what="tangent")
