"""Mode scopes: ``linear-layers`` (= ``attn``, = ``attn-block``) is exactly the q, k, v, o weights of every block."""

from __future__ import annotations

import pytest
from torch import nn

from taft.arithmetic import MODES
from taft.models.classifier import Classifier
from taft.tangent_model import TangentModel
from taft.zoo import TINY


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Outermost attention modules (found by type name, independently of the families' own lists): BertAttention
    (self-attention + output projection), ViTAttention, CLIPAttention, timm's Attention, nn.MultiheadAttention."""
    found = []
    for name, m in model.named_modules():
        kind = type(m).__name__.lower()
        is_attention = "attention" in kind and not ("block" in kind or "layer" in kind)  # not a whole block
        if is_attention and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    return found


def _expected(model: nn.Module, prefix: str = "") -> tuple[set[str], set[str]]:
    """(weights, biases) of every linear map inside the attention blocks."""
    weights, biases = set(), set()
    for name, att in _attention_modules(model):
        for sub, m in att.named_modules():
            q = ".".join(x for x in (prefix, name, sub) if x)
            if isinstance(m, nn.Linear):
                weights.add(f"{q}.weight")
                if m.bias is not None:
                    biases.add(f"{q}.bias")
            if isinstance(m, nn.MultiheadAttention):
                weights.add(f"{q}.in_proj_weight")
                if m.in_proj_bias is not None:
                    biases.add(f"{q}.in_proj_bias")
    return weights, biases


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-vit", "tiny-hf-vit", "tiny-clip-vision", "tiny-open-clip"])
def test_linear_layers_scope_is_exactly_qkvo_weights(name):
    model = TINY[name]()
    weights, biases = _expected(model)
    blocks = TangentModel(model, "attn").family.blocks()
    assert weights and len(blocks) >= 1
    for mode in ("linear-layers", "attn-block"):
        assert set(TangentModel(model, MODES[mode].scope, linear=False).linearized) == weights, mode
    for mode in ("attn+bias", "attn-block+bias"):
        assert set(TangentModel(model, MODES[mode].scope, linear=False).linearized) == weights | biases, mode
    # q, k, v and o of every block: 4·D output rows per block, whether fused (qkv, in_proj) or not
    params = dict(model.named_parameters())
    dim = params[sorted(weights)[0]].shape[1]
    for block in blocks:
        rows = sum(params[w].shape[0] for w in weights if w.startswith(block.prefixes[0] + "."))
        assert rows == 4 * dim, (block.name, rows, dim)
    assert sum(params[w].shape[0] for w in weights) == 4 * dim * len(blocks)


def test_encoder_modes_exclude_the_head():
    model = Classifier(TINY["tiny-bert"](), 3)
    for mode in MODES.values():
        names = TangentModel(model, mode.scope, linear=mode.linear).linearized
        assert names and not any(n.startswith("head.") for n in names), mode.name
    full = TangentModel(model, MODES["nonlinear"].scope, linear=False).linearized
    used = TangentModel(model, "all", linear=False).linearized
    assert set(full) == set(used) - {"head.weight", "head.bias"}
