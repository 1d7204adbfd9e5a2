"""timm VisionTransformer family (small random-init configs) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch

from taft.engine.family import family_for
from taft.engine.reference import max_rel_err, reference_jvp, reference_vjp
from taft.models.timm_vit import TimmViTFamily, tiny_timm_vit
from taft.tangent_model import TangentModel
from tests.helpers import assert_close, check_against_reference, check_finite_difference, randomize_delta


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny float64 GEMMs: thread wake-ups dominate on a 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

CONFIGS = {
    "default": {},
    # CLIP-style: pre-norm, QuickGELU, LayerScale, register tokens, avg pool + fc_norm, features only, qk-norm.
    "clip_like": dict(pre_norm=True, act_layer="quick_gelu", init_values=0.5, reg_tokens=2, global_pool="avg",
                      num_classes=0, qk_norm=True, drop_path_rate=0.1),
    # DeiT-3 style: position embedding on patches only, LayerScale, tanh GELU, explicit (non-SDPA) attention.
    "deit3_like": dict(no_embed_class=True, init_values=0.1, act_layer="gelu_tanh", reg_tokens=1),
    # No position embedding, no class token, no pooling: every token's logits.
    "no_pos_no_cls": dict(pos_embed="none", class_token=False, global_pool=""),
}


def build(config: str = "default", seed: int = 0, dtype=torch.float64):
    m = tiny_timm_vit(seed=seed, **CONFIGS[config])
    if config == "deit3_like":
        for blk in m.blocks:
            blk.attn.fused_attn = False
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter off its special init (zero biases, unit norms, tiny cls)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.to(dtype)


def inputs(m, batch=3, seed=0):
    return family_for(m).example_inputs(batch, torch.Generator().manual_seed(seed))


def test_family_is_picked():
    assert isinstance(family_for(build()), TimmViTFamily)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("scope", ["all", "last:1", "attn", "head"])
def test_matches_reference(config, scope):
    m = build(config)
    tm = TangentModel(m, scope)
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


@pytest.mark.parametrize("batch", [1, 3])
def test_finite_difference(batch):
    m = build("clip_like")
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m, batch)
    check_finite_difference(tm, *args, **kw)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_zero_delta_is_exact_primal(config):
    m = build(config)
    tm = TangentModel(m, "all")
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    assert torch.count_nonzero(t) == 0
    assert torch.equal(tm(*args, **kw), f0)
    with torch.no_grad():
        y = m(*args, **kw)
    assert max_rel_err(f0.detach(), y) <= 1e-12


def test_attention_mask_passed_to_blocks():
    m = build()
    tm = TangentModel(m, "last:1")
    randomize_delta(tm, 0.1)
    (x,), _ = inputs(m, 2)
    T = 1 + m.patch_embed.num_patches
    mask = torch.rand(2, 1, T, T, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True  # every query attends at least the CLS token
    check_against_reference(tm, x, attn_mask=mask)
    assert tm.fallback_modules == []


def test_float32():
    m = build(dtype=torch.float32)
    tm = TangentModel(m, "all")
    randomize_delta(tm, 1e-2)
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    y, ty = reference_jvp(tm, *args, **kw)
    assert_close(f0.detach(), y, what="primal", dtype=torch.float32)
    assert_close(t.detach(), ty, what="tangent", dtype=torch.float32)


@pytest.mark.parametrize("config", ["default", "clip_like"])
def test_linearize_cls_matches_fallback(config):
    m = build(config)
    args, kw = inputs(m)
    tm = TangentModel(m, "last:1", linearize_cls=True)
    randomize_delta(tm, 0.1)
    f0, t = tm.forward_parts(*args, **kw)
    assert tm.fallback_modules == []
    ref = TangentModel(m, "last:1", linearize_cls=True, force_fallback=True)
    randomize_delta(ref, 0.1)
    f0r, tr = ref.forward_parts(*args, **kw)
    assert ref.fallback_modules  # the reference really ran the jvp fallback
    assert_close(f0.detach(), f0r.detach(), what="primal")
    assert_close(t.detach(), tr.detach(), what="tangent")


def test_cls_init_is_the_embedded_cls_token():
    m = build("clip_like")
    fam = family_for(m)
    (x,), _ = inputs(m, 1)
    from taft.engine.context import TangentContext
    from taft.engine.family import State

    ctx = TangentContext(dict(m.named_parameters()), {}, vjp=False)
    with torch.no_grad():
        h = fam.run_stage(ctx, 0, fam.prepare(x)).h.primal
    assert_close(fam.cls_init(), h[0, 0], what="cls")
    assert State  # noqa: B018


@pytest.mark.parametrize("config", ["default", "clip_like"])
def test_reinit_matches_reference(config):
    m = build(config)
    tm = TangentModel(m, "last:1", reinit=True)
    w0 = tm.base_params()
    changed = [n for n, p in m.named_parameters() if n.startswith("blocks.1.") and not torch.equal(p, w0[n])]
    assert changed, "reinit left the block unchanged"
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


def test_head_scope_selects_final_norm_and_head():
    tm = TangentModel(build(), "head")
    assert tm.linearized == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    tm = TangentModel(build(), "attn")
    assert tm.linearized == [f"blocks.{i}.attn.{p}.weight" for i in range(2) for p in ("qkv", "proj")]


@pytest.mark.parametrize("kw", [dict(global_pool="map"), dict(global_pool="max"), dict(dynamic_img_size=True)])
def test_unsupported_options_raise(kw):
    with pytest.raises(NotImplementedError):
        TangentModel(tiny_timm_vit(**kw).double(), "all")


def test_vjp_gradient_and_nonlinear_mode():
    """backward='vjp' gives Jᵀg of the model at w0; linear=False is f(w0 + Δ) through the same stages."""
    m = build("clip_like")
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


def test_drop_path_in_training_shares_the_mask():
    """Stochastic depth in training: with the same seed the rule draws the model's per-sample masks."""
    m = tiny_timm_vit(drop_path_rate=0.5, init_values=0.3).double().train()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m, 4)
    torch.manual_seed(7)
    f0, t = tm.forward_parts(*args, **kw)
    torch.manual_seed(7)
    y, ty = reference_jvp(tm, *args, **kw)
    assert tm.fallback_modules == []
    assert_close(f0.detach(), y, what="primal")
    assert_close(t.detach(), ty, what="tangent")


def test_layer_norm_fp32():
    """LayerNormFp32 computes in float32 inside a float64 model: the rule does the same (float32 tolerance)."""
    from timm.layers import LayerNormFp32

    m = tiny_timm_vit(norm_layer=LayerNormFp32).double()
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    assert tm.fallback_modules == []
    y, ty = reference_jvp(tm, *args, **kw)
    assert_close(f0.detach(), y, what="primal", dtype=torch.float32)
    assert_close(t.detach(), ty, what="tangent", dtype=torch.float32)
