"""Identity-like rules: nn.Identity; nn.Dropout (identity in eval, one shared mask on primal and tangent in train)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from taft.engine.dual import Dual
from taft.engine.registry import find_rule
from taft.rules.identity import dropout_rule, identity_rule
from tests.rules import _rule_harness as rh

NAME = "blk.drop"


def _eval_modules():
    return [nn.Identity(), nn.Dropout(0.3).eval(), nn.Dropout(0.0).train()]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["identity", "dropout-eval", "dropout-p0-train"])
@pytest.mark.parametrize("dtype", rh.DTYPES)
@rh.RULE_SETTINGS
@given(shape=rh.SHAPES, layout=st.sampled_from(rh.LAYOUTS), seed=rh.SEEDS)
def test_identity_like_matches_jvp(which, dtype, shape, layout, seed):
    m = _eval_modules()[which]
    x, xdot = rh.input_and_tangent(shape, seed, dtype, layout)
    out, _ = rh.check_rule(m, NAME, {}, {}, x, xdot)
    assert torch.equal(out.primal, x) and torch.equal(out.tangent, xdot)  # bit-exact pass-through
    rh.check_no_tangent(m, NAME, {}, x)


@pytest.mark.parametrize("which", [0, 1], ids=["identity", "dropout-eval"])
def test_identity_like_finite_difference_and_reference_nonzero(which):
    g = rh.gen(61)
    m = _eval_modules()[which]
    x, xdot = rh.rand((1, 1, 5), g), rh.rand((1, 1, 5), g)
    rh.check_rule_finite_difference(m, NAME, {}, {}, x, xdot)
    _, ty = rh.check_rule(m, NAME, {}, {}, x, xdot)
    assert ty.abs().max() > 0.1


def test_registry_identity_and_dropout():
    assert find_rule(nn.Identity()).fn is identity_rule
    assert find_rule(nn.Dropout()).fn is dropout_rule
    # other dropout classes are not nn.Dropout subclasses and have no rule here
    assert find_rule(nn.Dropout2d()) is None


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", rh.DTYPES)
def test_dropout_train_same_mask_on_both_parts(p, dtype):
    torch.manual_seed(62)
    g = rh.gen(62)
    m = nn.Dropout(p).train()
    x = rh.rand((4, 6, 8), g, dtype, "transposed")
    xdot = rh.rand((4, 6, 8), g, dtype)
    out = rh.run_rule(m, NAME, {}, {}, Dual(x, xdot))
    y, t = out.primal, out.tangent
    keep = 1.0 / (1.0 - p)
    # both parts are x·mask/(1 − p) with the SAME mask: zero pattern identical, survivors scaled by 1/(1 − p)
    assert torch.isin((y / x).double().unique().round(decimals=4),
                      torch.tensor([0.0, round(keep, 4)], dtype=torch.float64)).all()
    assert torch.equal(y == 0, t == 0)
    ratio_y, ratio_t = y / x, t / xdot  # x, ẋ are nonzero almost surely (randn)
    assert torch.allclose(ratio_y, ratio_t, rtol=4 * torch.finfo(dtype).eps, atol=0)
    dropped = (y == 0).double().mean().item()
    assert 0 < dropped < 1  # 192 draws: both outcomes occur (probability of failure < 1e-8)
    assert abs(dropped - p) < 0.2


def test_dropout_train_masks_are_fresh_per_call():
    torch.manual_seed(63)
    m = nn.Dropout(0.5).train()
    x = torch.ones(64, dtype=torch.float64)
    a = rh.run_rule(m, NAME, {}, {}, Dual(x, x))
    b = rh.run_rule(m, NAME, {}, {}, Dual(x, x))
    assert not torch.equal(a.primal, b.primal)
    assert torch.equal(a.primal, a.tangent) and torch.equal(b.primal, b.tangent)


def test_dropout_train_no_tangent_has_no_tangent():
    torch.manual_seed(64)
    m = nn.Dropout(0.5).train()
    x = torch.ones(32, dtype=torch.float64)
    from taft.engine.context import TangentContext

    out = TangentContext({}, {}, vjp=False).call(m, NAME, Dual(x, None))
    assert out.tangent is None
    assert torch.isin(out.primal.unique(), torch.tensor([0.0, 2.0], dtype=torch.float64)).all()
    direct = dropout_rule(TangentContext({}, {}, vjp=False), m, NAME, Dual(x, None))
    assert direct.tangent is None
