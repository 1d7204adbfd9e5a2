"""Hugging Face ViT (``ViTModel``, transformers 5.x layout: ``layers.i`` with ``q/k/v/o_proj``): rules and family.

Pre-LN blocks: ``a = x + W_o·MHA(LN_before(x))``, ``y = a + fc2(GELU(fc1(LN_after(a))))``. Embeddings:
``[cls; Conv(x)ᵀ] + pos``. The family's output is ``last_hidden_state`` = ``layernorm(h)`` (the pooler is not
part of it and is left out of every scope).

Not supported (:class:`~taft.errors.UnsupportedError`): ``bool_masked_pos`` (masked image modeling),
``attention_mask``, and position-embedding interpolation to a different image size; attention dropout in
training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformers import ViTConfig, ViTModel
from transformers.models.vit import modeling_vit as mv

from taft.engine.dual import Dual, as_dual, dual_add, dual_cat, dual_map
from taft.engine.family import Family, Stage, State, refuse_arguments, register_family, reinit_hf
from taft.engine.registry import first_output, register_rule
from taft.errors import UnsupportedError
from taft.rules.attention import separate_qkv_attention


@register_rule(mv.ViTPatchEmbeddings)
def vit_patch_embeddings_rule(ctx, m: mv.ViTPatchEmbeddings, name: str, pixel_values) -> Dual:
    """``y = flatten(conv(x, W) + b)ᵀ``: the Conv2d rule then a linear reshape (B, D, h, w) → (B, h·w, D)."""
    x = as_dual(pixel_values)
    if x.primal.shape[1] != m.num_channels:
        raise ValueError(
            "Make sure that the channel dimension of the pixel values match with the one set in the configuration."
            f" Expected {m.num_channels} but got {x.primal.shape[1]}."
        )
    h = ctx.call(m.projection, f"{name}.projection", x)
    return dual_map(h, lambda t: t.flatten(2).transpose(1, 2))


@register_rule(mv.ViTEmbeddings)
def vit_embeddings_rule(ctx, m: mv.ViTEmbeddings, name: str, pixel_values, bool_masked_pos=None,
                        interpolate_pos_encoding: bool = False) -> Dual:
    """``y = dropout([cls; P(x)] + pos)``: ``ẏ = [ċls; Ṗ] + ṗos`` (cls and pos are parameters, broadcast over B)."""
    if bool_masked_pos is not None:
        raise UnsupportedError("HF ViT embeddings rule: bool_masked_pos (masked image modeling) is not supported")
    x = as_dual(pixel_values)
    B, _, H, W = x.primal.shape
    e = ctx.call(m.patch_embeddings, f"{name}.patch_embeddings", x)  # (B, N, D)
    n_patches, n_pos = e.primal.shape[1], m.position_embeddings.shape[1] - 1
    if interpolate_pos_encoding:
        if not (n_patches == n_pos and H == W):  # else HF leaves the table unchanged
            raise UnsupportedError("HF ViT embeddings rule: position-embedding interpolation is not supported")
    elif tuple(m.image_size) != (H, W):
        raise ValueError(f"Input image size ({H}*{W}) doesn't match model ({m.image_size[0]}*{m.image_size[1]}).")
    cls = dual_map(ctx.param(f"{name}.cls_token"), lambda t: t.expand(B, -1, -1))
    e = dual_add(dual_cat([cls, e], 1), ctx.param(f"{name}.position_embeddings"))
    return ctx.call(m.dropout, f"{name}.dropout", e)


@register_rule(mv.ViTAttention, plain_output=first_output)
def vit_attention_rule(ctx, m: mv.ViTAttention, name: str, h: Dual, attention_mask: Tensor | None = None,
                       **kwargs) -> Dual:
    """``Q, K, V = q/k/v_proj(h)`` (Linear rule), ``O = softmax(s·QKᵀ + M)V`` (:func:`attention_dual`,
    ``s = d^-½``), ``y = o_proj(O)``. The same maths for every ``attn_implementation``."""
    if m.training and m.attention_dropout > 0.0:
        raise UnsupportedError("HF ViT attention rule: attention dropout in training mode is not supported; "
                               "call model.eval() (or set the dropout to 0) before the tangent forward")
    return separate_qkv_attention(ctx, m, name, h, ("q_proj", "k_proj", "v_proj", "o_proj"), head_dim=m.head_dim,
                                  scale=m.scaling, mask=attention_mask)


@register_rule(mv.ViTMLP)
def vit_mlp_rule(ctx, m: mv.ViTMLP, name: str, h: Dual) -> Dual:
    """``y = fc2(act(fc1(h)))``: Linear and activation rules chained."""
    h = ctx.call(m.fc1, f"{name}.fc1", h)
    h = ctx.call(m.activation_fn, f"{name}.activation_fn", h)
    return ctx.call(m.fc2, f"{name}.fc2", h)


@register_rule(mv.ViTLayer)
def vit_layer_rule(ctx, m: mv.ViTLayer, name: str, h: Dual, attention_mask: Tensor | None = None,
                   **kwargs) -> Dual:
    """``a = h + drop(attn(LN_before(h)))``, ``y = a + drop(mlp(LN_after(a)))``; residual adds are linear."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    a = ctx.call(m.layernorm_before, f"{name}.layernorm_before", h)
    a = ctx.call(m.attention, f"{name}.attention", a, **kw)
    h = dual_add(ctx.call(m.dropout, f"{name}.dropout", a), h)
    b = ctx.call(m.layernorm_after, f"{name}.layernorm_after", h)
    b = ctx.call(m.mlp, f"{name}.mlp", b)
    return dual_add(ctx.call(m.dropout, f"{name}.dropout", b), h)


@register_family
class HFViTFamily(Family):
    arch = "hf-vit"
    model_types = (ViTModel,)

    def __init__(self, model: nn.Module, root: str = "") -> None:
        super().__init__(model, root)
        if not hasattr(model, "layers"):
            raise UnsupportedError("HF ViT family: expects the transformers 5.x layout (ViTModel.layers)")

    def stages(self) -> list[Stage]:
        n = len(self.model.layers)
        return (
            [Stage("embeddings", (self.q("embeddings"),))]
            + [Stage(f"layers.{i}", (self.q(f"layers.{i}"),), block=True) for i in range(n)]
            + [Stage("layernorm", (self.q("layernorm"),))]
        )

    def head_prefixes(self) -> list[str]:
        return [self.q("layernorm")]

    def attn_linear_weights(self) -> list[str]:
        out = []
        for i in range(len(self.model.layers)):
            p = self.q(f"layers.{i}.attention")
            out += [f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight", f"{p}.o_proj.weight"]
        return out

    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def cls_init(self) -> Tensor:
        """The embeddings' output at the CLS position: ``cls_token + position_embeddings[0]``."""
        e = self.model.embeddings
        with torch.no_grad():
            return (e.cls_token[0, 0] + e.position_embeddings[0, 0]).detach().clone()

    def reinit_module(self, module: nn.Module) -> None:
        reinit_hf(self.model, module)

    def prepare(self, pixel_values: Tensor, bool_masked_pos=None, interpolate_pos_encoding: bool | None = None,
                attention_mask: Tensor | None = None, **kwargs) -> State:
        refuse_arguments(self.arch, kwargs)
        if bool_masked_pos is not None:
            raise UnsupportedError("HF ViT family: bool_masked_pos (masked image modeling) is not supported")
        if attention_mask is not None:
            raise UnsupportedError("HF ViT family: attention_mask is not supported")
        dt = self.model.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != dt:  # as ViTModel.forward does
            pixel_values = pixel_values.to(dt)
        return State(None, {"pixel_values": pixel_values, "interpolate_pos_encoding": bool(interpolate_pos_encoding)})

    def run_stage(self, ctx, i: int, state: State) -> State:
        m, n = self.model, len(self.model.layers)
        if i == 0:
            kw = {"interpolate_pos_encoding": True} if state.aux["interpolate_pos_encoding"] else {}
            h = ctx.call(m.embeddings, self.q("embeddings"), state.aux["pixel_values"], **kw)
            return State(h, state.aux)
        if i <= n:
            return State(ctx.call(m.layers[i - 1], self.q(f"layers.{i - 1}"), state.h), state.aux)
        return State(ctx.call(m.layernorm, self.q("layernorm"), state.h), state.aux)

    def select_output(self, out) -> Tensor:
        return out.last_hidden_state

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        cfg = self.model.config
        size = cfg.image_size if isinstance(cfg.image_size, Iterable) else (cfg.image_size, cfg.image_size)
        w = self.model.embeddings.patch_embeddings.projection.weight
        x = torch.randn(batch, cfg.num_channels, *size, generator=generator)
        return (x.to(device=w.device, dtype=w.dtype),), {}


def tiny_hf_vit(seed: int = 0, **overrides) -> ViTModel:
    """A small random-init ``ViTModel`` (32px, patch 8, width 32, 2 layers, 4 heads, MLP 64), eval mode."""
    torch.manual_seed(seed)
    kw = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)
    kw.update(overrides)
    return ViTModel(ViTConfig(**kw)).eval()


def load_hf_vit(name: str, pretrained: bool = True) -> ViTModel:
    """``ViTModel.from_pretrained(name)`` (or the same config, random-init), eval mode (needs the hub)."""
    if pretrained:
        return ViTModel.from_pretrained(name).eval()
    return ViTModel(ViTConfig.from_pretrained(name)).eval()
