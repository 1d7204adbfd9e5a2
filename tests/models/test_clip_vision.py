"""HF CLIP vision family (CLIPVisionModel and ...WithProjection, small random-init) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch

from taft.engine.context import TangentContext
from taft.engine.family import family_for
from taft.engine.reference import max_rel_err, reference_jvp, reference_vjp
from taft.models.clip_vision import CLIPVisionFamily, CLIPVisionProjectionFamily, tiny_clip_vision
from taft.tangent_model import TangentModel
from tests.helpers import assert_close, check_against_reference, check_finite_difference, randomize_delta


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny float64 GEMMs: thread wake-ups dominate on a 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(seed: int = 0, dtype=torch.float64, projection: bool = False, **overrides):
    m = tiny_clip_vision(seed=seed, projection=projection, **overrides)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter off its special init (zero biases, unit norms)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.to(dtype)


def inputs(m, batch=3, seed=0):
    return family_for(m).example_inputs(batch, torch.Generator().manual_seed(seed))


def test_family_is_picked():
    assert isinstance(family_for(build()), CLIPVisionFamily)
    assert isinstance(family_for(build(projection=True)), CLIPVisionProjectionFamily)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("scope", ["all", "last:1", "attn", "head"])
def test_matches_reference(scope, projection):
    m = build(projection=projection)
    tm = TangentModel(m, scope)
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


@pytest.mark.parametrize("batch", [1, 3])
def test_finite_difference(batch):
    m = build()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m, batch)
    check_finite_difference(tm, *args, **kw)


@pytest.mark.parametrize("projection", [False, True])
def test_zero_delta_is_exact_primal(projection):
    m = build(projection=projection)
    tm = TangentModel(m, "all")
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    assert torch.count_nonzero(t) == 0
    assert torch.equal(tm(*args, **kw), f0)
    with torch.no_grad():
        y = family_for(m).select_output(m(*args, **kw))
    assert max_rel_err(f0.detach(), y) <= 1e-12


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_float32(attn):
    # (HF's eager attention takes the softmax in float32 even for float64 models, so eager is checked here only)
    m = build(dtype=torch.float32, attn_implementation=attn)
    tm = TangentModel(m, "all")
    randomize_delta(tm, 1e-2)
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    y, ty = reference_jvp(tm, *args, **kw)
    assert_close(f0.detach(), y, what="primal", dtype=torch.float32)
    assert_close(t.detach(), ty, what="tangent", dtype=torch.float32)


def test_linearize_cls_matches_fallback():
    m = build()
    args, kw = inputs(m)
    tm = TangentModel(m, "last:1", linearize_cls=True)
    randomize_delta(tm, 0.1)
    f0, t = tm.forward_parts(*args, **kw)
    assert tm.fallback_modules == []
    ref = TangentModel(m, "last:1", linearize_cls=True, force_fallback=True)
    randomize_delta(ref, 0.1)
    f0r, tr = ref.forward_parts(*args, **kw)
    assert ref.fallback_modules
    assert_close(f0.detach(), f0r.detach(), what="primal")
    assert_close(t.detach(), tr.detach(), what="tangent")


def test_cls_init_is_the_embedded_cls_token():
    m = build()
    fam = family_for(m)
    (x,), _ = inputs(m, 1)
    ctx = TangentContext(dict(m.named_parameters()), {}, vjp=False)
    with torch.no_grad():
        h = fam.run_stage(ctx, 0, fam.prepare(x)).h.primal
    assert_close(fam.cls_init(), h[0, 0], what="cls")


@pytest.mark.parametrize("projection", [False, True])
def test_reinit_matches_reference(projection):
    m = build(projection=projection)
    tm = TangentModel(m, "last:1", reinit=True)
    w0 = tm.base_params()
    assert any(not torch.equal(p, w0[n]) for n, p in m.named_parameters() if ".layers.1." in n)
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


def test_scopes_select_expected_names():
    assert TangentModel(build(), "head").linearized == ["post_layernorm.weight", "post_layernorm.bias"]
    assert TangentModel(build(projection=True), "head").linearized == [
        "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"]
    names = TangentModel(build(), "attn").linearized
    expected = {f"encoder.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "k", "v", "out")}
    assert set(names) == expected


def test_vjp_gradient_and_nonlinear_mode():
    """backward='vjp' gives Jᵀg of the model at w0; linear=False is f(w0 + Δ) through the same stages."""
    m = build(projection=True)
    args, kw = inputs(m, 2)
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    y = tm(*args, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    grads = torch.autograd.grad((y * g).sum(), list(tm.delta_dict().values()))
    ref = reference_vjp(tm, g, *args, **kw)
    # one scale for all (the key bias has an exactly-zero gradient: softmax ignores a per-row constant)
    assert_close(torch.cat([a.flatten() for a in grads]), torch.cat([ref[n].flatten() for n in tm.linearized]),
                 what="vjp gradient")
    nl = TangentModel(m, "last:1", linear=False)
    randomize_delta(nl, 0.1)
    params = nl.base_params()
    for n, d in nl.delta_dict().items():
        params[n] = params[n] + d.detach()
    with torch.no_grad():
        expected = nl.family.select_output(torch.func.functional_call(m, params, args, kw))
    assert_close(nl(*args, **kw).detach(), expected, what="non-linear")
