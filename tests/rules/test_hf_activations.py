"""Hugging Face activation modules against torch.func.jvp of *their own* forward.

The rules map every tanh-form GELU onto ``F.gelu(approximate="tanh")``'s closed form. ``NewGELUActivation``
and ``GELUTanh(use_gelu_tanh_python=True)`` write the same function with the same constants (agreement to
rounding); ``FastGELUActivation`` uses the truncated constant 0.7978845608 for √(2/π) = 0.79788456080286…,
a relative change of 3.6e-12 — far below both tolerances but above float64 rounding, measured below.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import activations as hf_act

from taft.engine.dual import Dual
from taft.engine.reference import max_rel_err
from taft.engine.registry import find_rule
from taft.rules.hf_activations import hf_gelu_rule, hf_gelu_tanh_rule, hf_quick_gelu_rule
from tests.helpers import assert_close
from tests.rules import _rule_harness as rh

NAME = "encoder.layer.0.intermediate.intermediate_act_fn"

# id -> (factory, rule the registry must pick)
MODULES = {
    "GELUActivation": (lambda: hf_act.GELUActivation(), hf_gelu_rule),
    "GELUActivation-python": (lambda: hf_act.GELUActivation(use_gelu_python=True), hf_gelu_rule),
    "GELUTanh": (lambda: hf_act.GELUTanh(), hf_gelu_tanh_rule),
    "GELUTanh-python": (lambda: hf_act.GELUTanh(use_gelu_tanh_python=True), hf_gelu_tanh_rule),
    "NewGELUActivation": (lambda: hf_act.NewGELUActivation(), hf_gelu_tanh_rule),
    "FastGELUActivation": (lambda: hf_act.FastGELUActivation(), hf_gelu_tanh_rule),
    "QuickGELUActivation": (lambda: hf_act.QuickGELUActivation(), hf_quick_gelu_rule),
}
IDS = list(MODULES)


@pytest.mark.parametrize("mid", IDS)
def test_registered_rule(mid):
    factory, rule = MODULES[mid]
    assert find_rule(factory()).fn is rule


@pytest.mark.parametrize("mid", IDS)
@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), scale=rh.SCALES, seed=rh.SEEDS)
def test_hf_activation_matches_own_forward_jvp(mid, dtype, shape, layout, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, dtype, layout, scale)
    rh.check_rule(MODULES[mid][0](), NAME, {}, {}, x, xdot, elementwise=True)


@pytest.mark.parametrize("mid", IDS)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, seed=rh.SEEDS)
def test_hf_activation_no_tangent(mid, shape, seed):
    rh.check_no_tangent(MODULES[mid][0](), NAME, {}, rh.rand(shape, rh.gen(seed)))


@pytest.mark.parametrize("mid", IDS)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, scale=rh.SCALES, seed=rh.SEEDS)
def test_hf_activation_finite_difference(mid, shape, scale, seed):
    x, xdot = rh.input_and_tangent(shape, seed, scale=scale)
    rh.check_rule_finite_difference(MODULES[mid][0](), NAME, {}, {}, x, xdot, elementwise=True)


@pytest.mark.parametrize("mid", IDS)
@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_hf_activation_slope_at_zero_is_half(mid, dtype):
    xdot = rh.rand((2, 3), rh.gen(81), dtype)
    out = rh.run_rule(MODULES[mid][0](), NAME, {}, {}, Dual(torch.zeros(2, 3, dtype=dtype), xdot))
    assert torch.equal(out.tangent, 0.5 * xdot)


@pytest.mark.parametrize("mid", IDS)
@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_hf_activation_large_and_tiny_magnitude(mid, dtype):
    v = torch.tensor([1e-30, 1e-8, 1e-3, 10.0, 30.0, 1e3, 1e4], dtype=dtype)
    x = torch.cat([v, -v, torch.zeros(1, dtype=dtype)])
    xdot = torch.ones_like(x)
    m = MODULES[mid][0]()
    out = rh.run_rule(m, NAME, {}, {}, Dual(x, xdot))
    assert torch.isfinite(out.tangent).all()
    _, ty = torch.func.jvp(m, (x.double(),), (xdot.double(),))
    assert_close(out.tangent.double(), ty, what="tangent", dtype=dtype)
    # saturation: slope 1 for x ≥ 30, 0 for x ≤ −30 (within float rounding of the closed forms)
    assert torch.equal(out.tangent[4:7], xdot[4:7])
    assert out.tangent[11:14].abs().max() < 1e-12


@pytest.mark.parametrize("mid, bound", [
    ("GELUActivation", 1e-14), ("GELUActivation-python", 1e-14),
    ("GELUTanh", 1e-14), ("GELUTanh-python", 1e-14), ("NewGELUActivation", 1e-14),
    ("QuickGELUActivation", 1e-14),
    ("FastGELUActivation", 1e-11),  # truncated √(2/π): measured ≈ 3e-12, see the module docstring
])
def test_closed_form_vs_module_formula_discrepancy(mid, bound):
    """Quantifies how far each module's own formula is from the closed form the rule uses (float64)."""
    x = torch.linspace(-6.0, 6.0, 2001, dtype=torch.float64)
    xdot = torch.ones_like(x)
    m = MODULES[mid][0]()
    out = rh.run_rule(m, NAME, {}, {}, Dual(x, xdot))
    y, ty = torch.func.jvp(m, (x,), (xdot,))
    assert max_rel_err(out.primal, y) <= bound
    assert max_rel_err(out.tangent, ty) <= bound


def test_fast_gelu_constant_is_truncated():
    """Documents *why* FastGELU differs beyond rounding: the derivative's difference scales with Δc."""
    x = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    xdot = torch.ones_like(x)
    m = hf_act.FastGELUActivation()
    out = rh.run_rule(m, NAME, {}, {}, Dual(x, xdot))
    _, ty = torch.func.jvp(m, (x,), (xdot,))
    err = max_rel_err(out.tangent, ty)
    assert 1e-13 < err < 1e-11, err


def test_reference_nonzero_batch1_seq1_non_contiguous():
    g = rh.gen(82)
    x, xdot = rh.rand((1, 1, 6), g, layout="transposed"), rh.rand((1, 1, 6), g, layout="strided")
    for mid in IDS:
        _, ty = rh.check_rule(MODULES[mid][0](), NAME, {}, {}, x, xdot, elementwise=True)
        assert ty.abs().max() > 0.1, f"{mid}: reference tangent is (near) zero"


def test_unregistered_hf_activations_use_fallback():
    """Activations without a closed form (different maths) must not be caught by a GELU rule."""
    for m in (hf_act.AccurateGELUActivation(), hf_act.ClippedGELUActivation(-10, 10)):
        assert find_rule(m) is None
