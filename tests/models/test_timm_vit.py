"""timm VisionTransformer family: what is specific to it (the checks every family passes are in
``test_family_conformance.py``, over the configs below)."""

from __future__ import annotations

import pytest
import torch

from taft.engine.family import family_for
from taft.engine.reference import reference_jvp
from taft.models.timm_vit import TimmViTFamily, tiny_timm_vit
from taft.tangent_model import TangentModel
from tests.helpers import (
    assert_close,
    check_against_reference,
    example_inputs,
    jitter_params,
    tangent_model,
)

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
    return jitter_params(m, seed + 1, dtype)


def test_family_is_picked():
    assert isinstance(family_for(build()), TimmViTFamily)


def test_attention_mask_passed_to_blocks():
    m = build()
    tm = tangent_model(m, "last:1")
    (x,), _ = example_inputs(m, 2)
    T = 1 + m.patch_embed.num_patches
    mask = torch.rand(2, 1, T, T, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True  # every query attends at least the CLS token
    check_against_reference(tm, x, attn_mask=mask)
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


def test_drop_path_in_training_shares_the_mask():
    """Stochastic depth in training: with the same seed the rule draws the model's per-sample masks."""
    m = tiny_timm_vit(drop_path_rate=0.5, init_values=0.3).double().train()
    tm = tangent_model(m, "all")
    args, kw = example_inputs(m, 4)
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
    tm = tangent_model(m, "all")
    args, kw = example_inputs(m, 2)
    check_against_reference(tm, *args, dtype=torch.float32, **kw)
    assert tm.fallback_modules == []
