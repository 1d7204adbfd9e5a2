"""Classifier family (pool → normalize → head on a backbone) against torch.func.jvp; non-linear mode."""

from __future__ import annotations

import pytest
import torch

from taft.models.classifier import Classifier
from taft.tangent_model import TangentModel
from taft.zoo import tiny_bert
from tests.helpers import assert_close, check_against_reference, check_finite_difference, randomize_delta


def _clf(pooling="mean", normalize=False):
    torch.manual_seed(0)
    return Classifier(tiny_bert().eval(), 3, pooling=pooling, normalize=normalize).double()


def _inputs(m):
    return m and __import__("taft.engine.family", fromlist=["x"]).family_for(m).example_inputs(
        3, torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("mean", True), ("cls", False)])
@pytest.mark.parametrize("scope", ["last:1", "head", "all"])
def test_classifier_matches_reference(pooling, normalize, scope):
    m = _clf(pooling, normalize)
    tm = TangentModel(m, scope)
    randomize_delta(tm, 0.1)
    args, kw = _inputs(m)
    check_against_reference(tm, *args, **kw)
    check_finite_difference(tm, *args, **kw)
    assert tm.fallback_modules == []


def test_presets_on_a_classifier():
    m = _clf()
    assert TangentModel(m, "head").linearized == ["head.weight", "head.bias"]
    last = TangentModel(m, "last:1")
    assert last.linearized[-2:] == ["head.weight", "head.bias"]
    assert all(n.startswith(("backbone.encoder.layer.1.", "head.")) for n in last.linearized)
    assert last.family.arch == "classifier/hf-bert"


def test_nonlinear_mode_is_ordinary_fine_tuning():
    """linear=False computes f(w0 + Δ) with the model's own forward and its exact gradient."""
    m = _clf()
    args, kw = _inputs(m)
    tm = TangentModel(m, "last:1", linear=False)
    randomize_delta(tm, 0.1)
    y = tm(*args, **kw)
    params = tm.base_params()
    for n, d in tm.delta_dict().items():
        params[n] = params[n] + d
    ref = torch.func.functional_call(m, params, args, kw)
    assert_close(y.detach(), ref.detach(), what="primal")
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), list(tm.delta_dict().values()))
    refg = torch.autograd.grad((ref * g).sum(), list(tm.delta_dict().values()))
    assert_close(torch.cat([a.flatten() for a in grads]), torch.cat([b.flatten() for b in refg]), what="grad")
    # and it is not linear: doubling Δ does not double the change
    f0 = TangentModel(m, "last:1", linear=False)(*args, **kw).detach()
    tm.load_delta({n: 2 * d.detach() for n, d in tm.delta_dict().items()})
    y2 = tm(*args, **kw).detach()
    assert (y2 - f0 - 2 * (y.detach() - f0)).abs().max() > 1e-6


def test_set_head_overwrites_weight_and_bias():
    m = _clf()
    m.set_head(0.0)
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    w = torch.arange(m.head.weight.numel(), dtype=torch.float64).view_as(m.head.weight)
    m.set_head(w, 1.5)
    assert torch.equal(m.head.weight, w) and torch.equal(m.head.bias, torch.full_like(m.head.bias, 1.5))
