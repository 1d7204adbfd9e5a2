"""HF ViTModel family: what is specific to it (the checks every family passes are in
``test_family_conformance.py``, over the configs below)."""

from __future__ import annotations

import pytest
import torch

from taft.engine.family import family_for
from taft.models.hf_vit import HFViTFamily, tiny_hf_vit
from taft.tangent_model import TangentModel
from tests.helpers import check_against_reference, example_inputs, jitter_params, tangent_model

CONFIGS = {
    "default": {},
    # (HF's eager attention takes the softmax in float32 even for float64 models: checked in float32 only)
    "sdpa": dict(attn_implementation="sdpa"),
    "eager": dict(attn_implementation="eager"),
}


def build(config: str = "default", seed: int = 0, dtype=torch.float64, **overrides):
    return jitter_params(tiny_hf_vit(seed=seed, **CONFIGS[config], **overrides), seed + 1, dtype)


def test_family_is_picked():
    assert isinstance(family_for(build()), HFViTFamily)


def test_tanh_gelu_no_qkv_bias():
    m = build(hidden_act="gelu_pytorch_tanh", qkv_bias=False)
    tm = tangent_model(m, "all")
    check_against_reference(tm, *example_inputs(m)[0])
    assert tm.fallback_modules == []


def test_scopes_select_expected_names():
    assert TangentModel(build(), "head").linearized == ["layernorm.weight", "layernorm.bias"]
    names = TangentModel(build(), "attn").linearized
    assert names == [f"layers.{i}.attention.{p}_proj.weight" for i in range(2) for p in "qkvo"]


def test_unsupported_inputs_raise():
    m = build()
    tm = TangentModel(m, "all")
    (x,), _ = example_inputs(m, 1)
    with pytest.raises(NotImplementedError, match="bool_masked_pos"):
        tm(x, bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))


def test_interpolate_pos_encoding_at_native_size():
    m = build()
    tm = tangent_model(m, "all")
    (x,), _ = example_inputs(m, 2)
    check_against_reference(tm, x, interpolate_pos_encoding=True)
    bigger = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="interpolation"):
        tm(bigger, interpolate_pos_encoding=True)
