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
from tests.rules import _rule_harness as rh

NAME = "pooler.activation"


@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), scale=rh.SCALES, seed=rh.SEEDS)
def test_tanh_matches_jvp(dtype, shape, layout, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, dtype, layout, scale)
    rh.check_rule(nn.Tanh(), NAME, {}, {}, x, xdot, elementwise=True)


@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), seed=rh.SEEDS)
def test_tanh_no_tangent(shape, layout, seed):
    x = rh.rand(shape, rh.gen(seed), layout=layout)
    rh.check_rule_no_tangent(nn.Tanh(), NAME, {}, x, exact=True)


@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, scale=rh.SCALES, seed=rh.SEEDS)
def test_tanh_finite_difference(shape, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, scale=scale)
    rh.check_rule_finite_difference(nn.Tanh(), NAME, {}, {}, x, xdot, elementwise=True)


def test_tanh_concrete_values():
    x = torch.tensor([0.0, 1.0, -30.0, 1e4], dtype=torch.float64)
    xdot = torch.tensor([2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    out = rh.run_rule(nn.Tanh(), NAME, {}, {}, Dual(x, xdot))
    assert out.tangent[0].item() == 2.0
    assert abs(out.tangent[1].item() - 1.0 / math.cosh(1.0) ** 2) < 1e-15  # sech²(1) = 0.41997...
    assert out.tangent[2].item() == 0.0 and out.tangent[3].item() == 0.0  # saturated


def test_tanh_batch1_seq1_non_contiguous_reference_nonzero():
    g = rh.gen(41)
    x, xdot = rh.rand((1, 1, 4), g, layout="strided"), rh.rand((1, 1, 4), g, layout="strided")
    assert not x.is_contiguous()
    _, ty = rh.check_rule(nn.Tanh(), NAME, {}, {}, x, xdot, elementwise=True)
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"
    assert_close(rh.run_rule(nn.Tanh(), NAME, {}, {}, Dual(x, xdot)).tangent, (1 - torch.tanh(x) ** 2) * xdot,
                 what="tangent")
