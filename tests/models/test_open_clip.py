"""open_clip VisionTransformer family (small random-init configs) against torch.func.jvp."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU

from taft.engine.context import TangentContext
from taft.engine.family import family_for
from taft.engine.reference import max_rel_err, reference_jvp, reference_vjp
from taft.models.open_clip_vit import OpenCLIPViTFamily, tiny_open_clip_vit
from taft.tangent_model import TangentModel
from tests.helpers import assert_close, check_against_reference, check_finite_difference, randomize_delta


@pytest.fixture(autouse=True, scope="module")
def one_thread_no_mha_fastpath():
    # Tiny float64 GEMMs: thread wake-ups dominate on a 2-core machine. torch's fused MHA fast path (eval,
    # batch_first, self-attention) has no forward-mode derivative: the torch.func.jvp reference and the jvp
    # fallback need the slow path (same maths).
    n, fast = torch.get_num_threads(), torch.backends.mha.get_fastpath_enabled()
    torch.set_num_threads(1)
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.set_num_threads(n)
    torch.backends.mha.set_fastpath_enabled(fast)


CONFIGS = {
    "default": {},
    # OpenAI-CLIP style QuickGELU, LayerScale, avg pool with the final LN after pooling, sequence-first blocks.
    "quickgelu_ls_lnd": dict(act_layer=QuickGELU, ls_init_value=0.5, pool_type="avg", final_ln_after_pool=True),
    # No pooling (every token projected), tokens returned as well.
    "none_pool_tokens": dict(pool_type="none", output_tokens=True),
}


def build(config: str = "default", seed: int = 0, dtype=torch.float64):
    m = tiny_open_clip_vit(seed=seed, **CONFIGS[config])
    if config == "quickgelu_ls_lnd":  # the (L, N, D) layout of older open_clip / OpenAI CLIP
        m.transformer.batch_first = False
        for blk in m.transformer.resblocks:
            blk.attn.batch_first = False
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter off its special init (zero biases, unit norms)
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.to(dtype)


def inputs(m, batch=3, seed=0):
    return family_for(m).example_inputs(batch, torch.Generator().manual_seed(seed))


def test_family_is_picked():
    assert isinstance(family_for(build()), OpenCLIPViTFamily)


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
    m = build("quickgelu_ls_lnd")
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
    torch.backends.mha.set_fastpath_enabled(True)  # the model's own forward, fast path included
    try:
        with torch.no_grad():
            y = family_for(m).select_output(m(*args, **kw))
    finally:
        torch.backends.mha.set_fastpath_enabled(False)
    assert max_rel_err(f0.detach(), y) <= 1e-12


def test_float32():
    m = build(dtype=torch.float32)
    tm = TangentModel(m, "all")
    randomize_delta(tm, 1e-2)
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    y, ty = reference_jvp(tm, *args, **kw)
    assert_close(f0.detach(), y, what="primal", dtype=torch.float32)
    assert_close(t.detach(), ty, what="tangent", dtype=torch.float32)


@pytest.mark.parametrize("config", ["default", "quickgelu_ls_lnd"])
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


@pytest.mark.parametrize("config", ["default", "quickgelu_ls_lnd"])
def test_reinit_matches_reference(config):
    m = build(config)
    tm = TangentModel(m, "last:1", reinit=True)
    w0 = tm.base_params()
    changed = {n for n, p in m.named_parameters() if n.startswith("transformer.resblocks.1.")
               and not torch.equal(p, w0[n])}
    assert "transformer.resblocks.1.attn.in_proj_weight" in changed
    assert "transformer.resblocks.1.attn.out_proj.weight" in changed
    randomize_delta(tm, 0.1)
    args, kw = inputs(m)
    check_against_reference(tm, *args, **kw)
    assert tm.fallback_modules == []


def test_scopes_select_expected_names():
    assert TangentModel(build(), "head").linearized == ["proj", "ln_post.weight", "ln_post.bias"]
    names = TangentModel(build(), "attn").linearized
    assert names == [f"transformer.resblocks.{i}.attn.{p}" for i in range(2)
                     for p in ("in_proj_weight", "out_proj.weight")]


def test_attentional_pool_not_supported():
    m = tiny_open_clip_vit(attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=2).double()
    with pytest.raises(NotImplementedError, match="attentional pooling"):
        TangentModel(m, "all")


def test_custom_block_runs_the_fallback():
    m = tiny_open_clip_vit(qk_norm=True).double()
    tm = TangentModel(m, "last:1")
    randomize_delta(tm, 0.1)
    check_against_reference(tm, *inputs(m)[0])
    assert tm.fallback_modules == ["transformer.resblocks.1"]


def test_vjp_gradient_and_nonlinear_mode():
    """backward='vjp' gives Jᵀg of the model at w0; linear=False is f(w0 + Δ) through the same stages."""
    m = build("quickgelu_ls_lnd")
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


def test_layer_norm_fp32():
    """LayerNormFp32 (meant for fp16/bf16 towers; on CPU its weights must already be float32)."""
    from open_clip.transformer import LayerNormFp32

    m = tiny_open_clip_vit(norm_layer=LayerNormFp32)
    tm = TangentModel(m, "all")
    randomize_delta(tm, 0.1)
    args, kw = inputs(m, 2)
    f0, t = tm.forward_parts(*args, **kw)
    assert tm.fallback_modules == []
    y, ty = reference_jvp(tm, *args, **kw)
    assert_close(f0.detach(), y, what="primal", dtype=torch.float32)
    assert_close(t.detach(), ty, what="tangent", dtype=torch.float32)
