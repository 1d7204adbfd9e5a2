"""The reference takes a function of the parameters: ``jvp_of`` / ``vjp_of`` against closed forms (float64)."""

from __future__ import annotations

import torch

from taft.engine.reference import jvp_of, model_function, reference_jvp, vjp_of
from taft.models.timm_vit import tiny_timm_vit
from taft.tangent_model import TangentModel
from tests.helpers import randomize_delta


def _setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w0 = {"W": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    delta = {"W": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    return x, w0, delta


def test_jvp_of_a_function_matches_its_closed_form():
    x, w0, delta = _setup()
    y, t = jvp_of(lambda w: torch.tanh(x @ w["W"]), w0, delta)
    assert torch.allclose(y, torch.tanh(x @ w0["W"]), rtol=0, atol=1e-15)
    expected = (1 - torch.tanh(x @ w0["W"]) ** 2) * (x @ delta["W"])
    assert (t - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_vjp_of_a_function_matches_its_closed_form():
    x, w0, _ = _setup()
    g = torch.ones(4, 3, dtype=torch.float64)
    grad = vjp_of(lambda w: torch.tanh(x @ w["W"]), w0, g)["W"]
    expected = x.T @ ((1 - torch.tanh(x @ w0["W"]) ** 2) * g)
    assert (grad - expected).abs().max() <= 1e-12 * expected.abs().max()


def test_reference_jvp_is_jvp_of_the_model_function():
    tm = TangentModel(tiny_timm_vit(seed=0).double(), "last:1")
    randomize_delta(tm, 0.1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f, w0 = model_function(tm, (x,), {})
    assert set(w0) == set(tm.linearized)
    a, b = reference_jvp(tm, x), jvp_of(f, w0, tm.delta_dict())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and b[1].abs().max() > 0
