"""nn.Linear rule (``ẏ = ẋWᵀ + xẆᵀ + ḃ``) against torch.func.jvp, finite differences, and registry lookup."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.dual import Dual
from taft.engine.registry import find_rule
from taft.rules.linear import linear_rule
from tests.rules import _rule_harness as rh

NAME = "enc.lin"


def make_linear(d_in, d_out, bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias).to(dtype)


shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 8), st.integers(1, 8))
param_sets = st.sampled_from([("weight",), ("bias",), ("weight", "bias")])


def _case(case, lin, x, g, which):
    params = rh.module_params(lin, NAME)
    if lin.bias is None:
        which = tuple(w for w in which if w != "bias") or ("weight",)
    deltas = rh.make_deltas(params, which, g) if case in ("param", "both") else {}
    xdot = rh.rand(x.shape, g, x.dtype) if case in ("input", "both") else None
    return params, deltas, xdot


@pytest.mark.parametrize("case", ["input", "param", "both"])
@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=shapes, bias=st.booleans(), which=param_sets, layout=st.sampled_from(rh.LAYOUTS), seed=rh.SEEDS)
def test_linear_matches_jvp(case, dtype, shape, bias, which, layout, seed):
    b, t, d_in, d_out = shape
    g = rh.gen(seed)
    lin = make_linear(d_in, d_out, bias, dtype, seed)
    x = rh.rand((b, t, d_in), g, dtype, layout)
    params, deltas, xdot = _case(case, lin, x, g, which)
    rh.check_rule(lin, NAME, params, deltas, x, xdot)


@rh.RULE_SETTINGS
@given(shape=shapes, bias=st.booleans(), layout=st.sampled_from(rh.LAYOUTS), seed=rh.SEEDS)
def test_linear_no_tangent(shape, bias, layout, seed):
    b, t, d_in, d_out = shape
    g = rh.gen(seed)
    lin = make_linear(d_in, d_out, bias, seed=seed)
    x = rh.rand((b, t, d_in), g, layout=layout)
    params = rh.module_params(lin, NAME)
    rh.check_rule_no_tangent(lin, NAME, params, x, exact=False)


@rh.RULE_SETTINGS
@given(shape=shapes, bias=st.booleans(), seed=rh.SEEDS)
def test_linear_finite_difference(shape, bias, seed):
    b, t, d_in, d_out = shape
    g = rh.gen(seed)
    lin = make_linear(d_in, d_out, bias, seed=seed)
    x = rh.rand((b, t, d_in), g)
    rh.check_full_finite_difference(lin, NAME, x, g)


def test_linear_concrete_numbers():
    """Hand-computed: W=[[1,2],[3,4]], b=[1,-1], x=[1,1]; Ẇ=[[1,0],[0,1]], ḃ=[2,3], ẋ=[0,1]."""
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([1.0, -1.0]))
    params = rh.module_params(lin, NAME)
    deltas = {f"{NAME}.weight": torch.eye(2, dtype=torch.float64), f"{NAME}.bias": torch.tensor([2.0, 3.0]).double()}
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    xdot = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    out = rh.run_rule(lin, NAME, params, deltas, Dual(x, xdot))
    # y = xWᵀ + b = [3+1, 7-1]; ẏ = ẋWᵀ + xẆᵀ + ḃ = [2,4] + [1,1] + [2,3]
    assert torch.equal(out.primal, torch.tensor([[4.0, 6.0]], dtype=torch.float64))
    assert torch.equal(out.tangent, torch.tensor([[5.0, 8.0]], dtype=torch.float64))


def test_linear_batch1_seq1_no_bias_reference_nonzero():
    g = rh.gen(3)
    lin = make_linear(5, 3, bias=False, seed=3)
    x = rh.rand((1, 1, 5), g)
    params = rh.module_params(lin, NAME)
    deltas = rh.make_deltas(params, ["weight"], g)
    xdot = rh.rand(x.shape, g)
    _, ty = rh.check_rule(lin, NAME, params, deltas, x, xdot)
    assert ty.abs().max() > 0.1, "reference tangent is (near) zero: the check would pass vacuously"


def test_linear_non_contiguous_inputs():
    rh.check_non_contiguous(make_linear(6, 4, bias=True, seed=4), NAME, (3, 5, 6), seed=4)


def test_linear_bias_only_tangent_broadcasts():
    """Only ḃ linearized and no input tangent: ẏ is ḃ at every position (shape of y, not of b)."""
    g = rh.gen(5)
    lin = make_linear(3, 4, bias=True, seed=5)
    x = rh.rand((2, 3, 3), g)
    params = rh.module_params(lin, NAME)
    deltas = rh.make_deltas(params, ["bias"], g)
    out = rh.run_rule(lin, NAME, params, deltas, Dual(x, None))
    assert out.tangent.shape == (2, 3, 4)
    assert torch.equal(out.tangent, deltas[f"{NAME}.bias"].expand(2, 3, 4))


# -- registry ---------------------------------------------------------------------------------------------


class _ScaledLinear(nn.Linear):
    """Changes the maths: must not be handled by the Linear rule."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class _TaggedLinear(nn.Linear):
    """Same forward as nn.Linear (only adds an attribute): the Linear rule applies."""

    tag = "kept"


class _TaggedScaled(_ScaledLinear):
    """Inherits the overriding forward of its parent: still not the Linear rule."""


def test_registry_exact_type():
    assert find_rule(nn.Linear(2, 2)).fn is linear_rule


def test_registry_subclass_keeping_forward_uses_linear_rule():
    assert find_rule(_TaggedLinear(2, 2)).fn is linear_rule


@pytest.mark.parametrize("cls", [_ScaledLinear, _TaggedScaled])
def test_registry_subclass_overriding_forward_has_no_rule(cls):
    assert find_rule(cls(2, 2)) is None


def test_subclass_overriding_forward_goes_to_fallback_and_is_correct():
    g = rh.gen(6)
    torch.manual_seed(6)
    m = _ScaledLinear(3, 2).double()
    x = rh.rand((2, 4, 3), g)
    params = rh.module_params(m, NAME)
    deltas = rh.make_deltas(params, ["weight", "bias"], g)
    xdot = rh.rand(x.shape, g)
    from taft.engine.context import TangentContext

    ctx = TangentContext(params, deltas, vjp=False)
    out = ctx.call(m, NAME, Dual(x, xdot))
    assert ctx.fallback_modules == [NAME]
    y, ty = rh.reference(m, NAME, params, deltas, x, xdot)
    # The doubled output proves the subclass's forward (not nn.Linear's) was differentiated.
    plain = rh.run_rule(nn.Linear(3, 2).double(), NAME, params, deltas, Dual(x, xdot))
    assert torch.allclose(out.primal, 2 * plain.primal) and torch.allclose(out.tangent, 2 * plain.tangent)
    assert torch.allclose(out.primal, y) and torch.allclose(out.tangent, ty)


def test_subclass_keeping_forward_uses_rule_and_is_correct():
    g = rh.gen(7)
    torch.manual_seed(7)
    m = _TaggedLinear(3, 2).double()
    x = rh.rand((2, 4, 3), g)
    params = rh.module_params(m, NAME)
    rh.check_rule(m, NAME, params, rh.make_deltas(params, ["weight"], g), x, rh.rand(x.shape, g))
