"""open_clip VisionTransformer family: what is specific to it (the checks every family passes are in
``test_family_conformance.py``, over the configs below)."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU

from taft.engine.family import family_for
from taft.models.open_clip_vit import OpenCLIPViTFamily, tiny_open_clip_vit
from taft.tangent_model import TangentModel
from tests.helpers import (
    check_against_reference,
    example_inputs,
    jitter_params,
    mha_fastpath,
    tangent_model,
)


@pytest.fixture(autouse=True, scope="module")
def no_mha_fastpath():
    # torch's fused MHA fast path (eval, batch_first, self-attention) has no forward-mode derivative: the
    # torch.func.jvp reference and the jvp fallback need the slow path (same maths).
    with mha_fastpath(False):
        yield


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
    return jitter_params(m, seed + 1, dtype)


def test_family_is_picked():
    assert isinstance(family_for(build()), OpenCLIPViTFamily)


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
    tm = tangent_model(m, "last:1")
    check_against_reference(tm, *example_inputs(m)[0])
    assert tm.fallback_modules == ["transformer.resblocks.1"]


def test_layer_norm_fp32():
    """LayerNormFp32 (meant for fp16/bf16 towers; on CPU its weights must already be float32)."""
    from open_clip.transformer import LayerNormFp32

    m = tiny_open_clip_vit(norm_layer=LayerNormFp32)
    tm = tangent_model(m, "all")
    args, kw = example_inputs(m, 2)
    check_against_reference(tm, *args, dtype=torch.float32, **kw)
    assert tm.fallback_modules == []
