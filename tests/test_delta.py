"""Δw algebra (taft.delta): exact identities, refusals, and the linearity the composition features rely on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taft import delta as D
from taft.models.timm_vit import tiny_timm_vit
from taft.tangent_model import TangentModel
from tests.helpers import assert_close, example_inputs, jitter_params


def rand_delta(seed: int, names=("a.weight", "a.bias", "b.weight"), shapes=((3, 4), (3,), (2, 2)),
               dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=dtype) for n, s in zip(names, shapes, strict=True)}


def equal(a, b):
    return list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


@settings(max_examples=25, deadline=None, database=None)
@given(s1=st.integers(0, 10**6), s2=st.integers(0, 10**6), c=st.floats(-3, 3))
def test_identities(s1, s2, c):
    a, b = rand_delta(s1), rand_delta(s2)
    a0 = {n: t.clone() for n, t in a.items()}
    for n, t in D.subtract(D.add(a, b), b).items():
        assert torch.allclose(t, a[n], rtol=0, atol=1e-12)
    assert equal(D.negate(D.negate(a)), a)
    assert equal(D.scale(a, 1.0), a)
    assert all(torch.equal(t, a[n] * c) for n, t in D.scale(a, c).items())
    assert D.dot(a, b) == pytest.approx(D.dot(b, a), rel=1e-12)
    assert D.norm(a) ** 2 == pytest.approx(D.dot(a, a), rel=1e-12)
    assert D.cosine(a, D.scale(a, 2.5)) == pytest.approx(1.0, abs=1e-12)
    assert D.cosine(a, D.negate(a)) == pytest.approx(-1.0, abs=1e-12)
    assert -1.0 <= D.cosine(a, b) <= 1.0
    assert equal(a, a0), "inputs were modified"


def test_dot_is_the_flat_inner_product():
    a, b = rand_delta(1), rand_delta(2)
    flat = lambda d: torch.cat([t.flatten() for t in d.values()])  # noqa: E731
    assert D.dot(a, b) == pytest.approx(float(flat(a) @ flat(b)), rel=1e-12)
    assert D.norm(a) == pytest.approx(float(flat(a).norm()), rel=1e-12)


def test_weighted_average():
    ds = [rand_delta(s) for s in range(3)]
    avg = D.weighted_average(ds, [1, 2, 3])
    for n in ds[0]:
        assert torch.allclose(avg[n], (ds[0][n] + 2 * ds[1][n] + 3 * ds[2][n]) / 6, rtol=0, atol=1e-12)
    assert all(torch.allclose(t, ds[0][n], rtol=0, atol=1e-15) for n, t in D.weighted_average([ds[0]] * 4).items())
    # a weight of 0 removes that Δw exactly (the unlearning identity: drop a shard = reweight it to 0)
    drop = D.weighted_average(ds, [1, 0, 3])
    for n in ds[0]:
        assert torch.allclose(drop[n], (ds[0][n] + 3 * ds[2][n]) / 4, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights,match", [([1, 2], "2 weights"), ([1, -1, 1], "≥ 0"), ([0, 0, 0], "positive sum"),
                                           ([1, math.nan, 1], "finite")])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(D.DeltaMismatchError, match=match):
        D.weighted_average([rand_delta(s) for s in range(3)], weights)


def test_mismatches_are_refused():
    a = rand_delta(0)
    with pytest.raises(D.DeltaMismatchError, match="different parameter names"):
        D.add(a, {k: v for k, v in a.items() if k != "a.bias"})
    with pytest.raises(D.DeltaMismatchError, match="shape"):
        D.add(a, {**a, "b.weight": torch.zeros(2, 3, dtype=torch.float64)})
    with pytest.raises(D.DeltaMismatchError, match="dtype"):
        D.dot(a, {k: v.float() for k, v in a.items()})
    with pytest.raises(D.DeltaMismatchError, match="zero Δw"):
        D.cosine(a, D.scale(a, 0.0))
    with pytest.raises(D.DeltaMismatchError, match="finite"):
        D.scale(a, math.inf)
    with pytest.raises(D.DeltaMismatchError, match="no Δw"):
        D.weighted_average([])


def test_zero_fill():
    big = rand_delta(0)
    small = {"a.bias": torch.ones(3, dtype=torch.float64)}
    out = D.zero_fill(small, big)
    assert list(out) == list(big)
    assert torch.equal(out["a.bias"], small["a.bias"]) and not out["a.weight"].any() and not out["b.weight"].any()
    out["a.bias"].add_(1)
    assert torch.equal(small["a.bias"], torch.ones(3, dtype=torch.float64)), "zero_fill must copy"
    with pytest.raises(D.DeltaMismatchError, match="outside the target scope"):
        D.zero_fill({"c.weight": torch.zeros(1)}, big)
    with pytest.raises(D.DeltaMismatchError, match="shape"):
        D.zero_fill({"a.bias": torch.zeros(4, dtype=torch.float64)}, big)


def test_average_of_tangent_models_is_the_average_of_their_outputs():
    """f_lin is affine in Δw: the model with the weighted-average Δw gives the weighted average of the shard
    models' outputs (float64, 1e-12) — what composition of shard models stands on."""
    m = jitter_params(tiny_timm_vit(seed=0), 1)
    tm = TangentModel(m, "all")
    args, kw = example_inputs(m, 3)
    g = torch.Generator().manual_seed(4)
    shards = [{n: 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype) for n, t in tm.delta_dict().items()}
              for _ in range(3)]
    weights = [5.0, 3.0, 2.0]
    outs = []
    with torch.no_grad():
        for d in shards:
            tm.load_delta(d)
            outs.append(tm(*args, **kw))
        tm.load_delta(D.weighted_average(shards, weights))
        composed = tm(*args, **kw)
    expected = sum(w * o for w, o in zip(weights, outs, strict=True)) / sum(weights)
    assert_close(composed, expected, what="composed output")
    assert max(o.sub(expected).abs().max().item() for o in outs) > 1e-3, "shard outputs agree: vacuous check"
