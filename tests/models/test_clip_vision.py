"""HF CLIP vision family (CLIPVisionModel and ...WithProjection): what is specific to it (the checks every
family passes are in ``test_family_conformance.py``, over the configs below)."""

from __future__ import annotations

import torch

from taft.engine.family import family_for
from taft.models.clip_vision import CLIPVisionFamily, CLIPVisionProjectionFamily, tiny_clip_vision
from taft.tangent_model import TangentModel
from tests.helpers import jitter_params

CONFIGS = {
    "default": {},
    "projection": dict(projection=True),  # CLIPVisionModelWithProjection
    # (HF's eager attention takes the softmax in float32 even for float64 models: checked in float32 only)
    "sdpa": dict(attn_implementation="sdpa"),
    "eager": dict(attn_implementation="eager"),
}


def build(config: str = "default", seed: int = 0, dtype=torch.float64):
    return jitter_params(tiny_clip_vision(seed=seed, **CONFIGS[config]), seed + 1, dtype)


def test_family_is_picked():
    assert isinstance(family_for(build()), CLIPVisionFamily)
    assert isinstance(family_for(build("projection")), CLIPVisionProjectionFamily)


def test_scopes_select_expected_names():
    assert TangentModel(build(), "head").linearized == ["post_layernorm.weight", "post_layernorm.bias"]
    assert TangentModel(build("projection"), "head").linearized == [
        "vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias", "visual_projection.weight"]
    names = TangentModel(build(), "attn").linearized
    expected = {f"encoder.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "k", "v", "out")}
    assert set(names) == expected
