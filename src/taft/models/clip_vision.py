"""Hugging Face CLIP vision tower (``CLIPVisionModel``, ``CLIPVisionModelWithProjection``): rules and family.

Embeddings ``e = [c; Conv(x)ᵀ] + P[ids]`` then ``pre_layrnorm``; pre-LN blocks
``a = x + out_proj(MHA(LN₁(x)))``, ``y = a + fc2(QuickGELU(fc1(LN₂(a))))``; output
``pooler_output = post_layernorm(h[:, 0])`` (and ``image_embeds = visual_projection(pooler_output)`` for the
``WithProjection`` model). ``last_hidden_state`` is not the family's output.

Not supported (:class:`~taft.errors.UnsupportedError`): position-embedding interpolation to another image
size; attention dropout in training; attention masks (the vision tower takes none).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
from transformers.models.clip import modeling_clip as mc

from taft.engine.dual import Dual, as_dual, dual_add, dual_cat, dual_map
from taft.engine.family import Family, Stage, State, refuse_arguments, register_family, reinit_hf
from taft.engine.registry import first_output, register_rule
from taft.errors import UnsupportedError
from taft.rules.attention import separate_qkv_attention


@register_rule(mc.CLIPVisionEmbeddings)
def clip_vision_embeddings_rule(ctx, m: mc.CLIPVisionEmbeddings, name: str, pixel_values,
                                interpolate_pos_encoding: bool = False) -> Dual:
    """``e = [c; flatten(conv(x, W))ᵀ] + P[ids]``: ``ė = [ċ; conv(x, Ẇ)ᵀ] + Ṗ[ids]`` (Conv2d and Embedding rules)."""
    x = as_dual(pixel_values)
    B, _, H, W = x.primal.shape
    if interpolate_pos_encoding:
        n_patches = (H // m.patch_size) * (W // m.patch_size)
        if not (n_patches == m.num_patches and H == W):  # else HF leaves the table unchanged
            raise UnsupportedError("CLIP vision embeddings rule: position-embedding interpolation is not supported")
    elif (m.image_size, m.image_size) != (H, W):
        raise ValueError(f"Input image size ({H}*{W}) doesn't match model ({m.image_size}*{m.image_size}).")
    dt = m.patch_embedding.weight.dtype
    x = dual_map(x, lambda t: t.to(dtype=dt))
    p = ctx.call(m.patch_embedding, f"{name}.patch_embedding", x)  # (B, D, h, w)
    p = dual_map(p, lambda t: t.flatten(2).transpose(1, 2))  # (B, N, D)
    c = dual_map(ctx.param(f"{name}.class_embedding"), lambda t: t.expand(B, 1, -1))
    pos = ctx.call(m.position_embedding, f"{name}.position_embedding", m.position_ids)  # (1, N+1, D)
    return dual_add(dual_cat([c, p], 1), pos)


@register_rule(mc.CLIPAttention, plain_output=first_output)
def clip_attention_rule(ctx, m: mc.CLIPAttention, name: str, hidden_states: Dual,
                        attention_mask: Tensor | None = None, **kwargs) -> Dual:
    """``Q, K, V = q/k/v_proj(h)`` (Linear rule), ``O = softmax(s·QKᵀ + M)V`` (:func:`attention_dual`,
    ``s = d^-½``), ``y = out_proj(O)``. The same maths for every ``attn_implementation``."""
    if m.training and m.dropout > 0.0:
        raise UnsupportedError("CLIP attention rule: attention dropout in training mode is not supported; "
                               "call model.eval() (or set the dropout to 0) before the tangent forward")
    if m.is_causal:
        raise UnsupportedError("CLIP attention rule: causal (text) attention is not supported")
    return separate_qkv_attention(ctx, m, name, hidden_states, ("q_proj", "k_proj", "v_proj", "out_proj"),
                                  head_dim=m.head_dim, scale=m.scale, mask=attention_mask)


@register_rule(mc.CLIPMLP)
def clip_mlp_rule(ctx, m: mc.CLIPMLP, name: str, h: Dual) -> Dual:
    """``y = fc2(act(fc1(h)))`` (act: QuickGELU for CLIP): Linear and activation rules chained."""
    h = ctx.call(m.fc1, f"{name}.fc1", h)
    h = ctx.call(m.activation_fn, f"{name}.activation_fn", h)
    return ctx.call(m.fc2, f"{name}.fc2", h)


@register_rule(mc.CLIPEncoderLayer)
def clip_encoder_layer_rule(ctx, m: mc.CLIPEncoderLayer, name: str, hidden_states: Dual,
                            attention_mask: Tensor | None = None, **kwargs) -> Dual:
    """``a = h + attn(LN₁(h))``, ``y = a + mlp(LN₂(a))``; residual adds are linear."""
    h = hidden_states
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    a = ctx.call(m.layer_norm1, f"{name}.layer_norm1", h)
    h = dual_add(h, ctx.call(m.self_attn, f"{name}.self_attn", a, **kw))
    b = ctx.call(m.layer_norm2, f"{name}.layer_norm2", h)
    return dual_add(h, ctx.call(m.mlp, f"{name}.mlp", b))


@register_family
class CLIPVisionFamily(Family):
    """``CLIPVisionModel``: output ``pooler_output``."""

    arch = "hf-clip-vision"
    model_types = (CLIPVisionModel,)
    _tower = ""  # where the CLIPVisionModel sits inside ``model``

    @classmethod
    def bypassed(cls, model: nn.Module) -> dict[str, tuple[type, ...]]:
        out = {f"{cls._tower}encoder": (mc.CLIPEncoder,)}  # its layers are called one by one
        if cls._tower:
            out[cls._tower.rstrip(".")] = (CLIPVisionModel,)
        return out

    def __init__(self, model: nn.Module, root: str = "") -> None:
        super().__init__(model, root)
        self.vm: CLIPVisionModel = model.get_submodule(self._tower.rstrip(".")) if self._tower else model
        if not hasattr(self.vm, "encoder") or not hasattr(self.vm, "embeddings"):
            raise UnsupportedError("CLIP vision family: expects the transformers 5.x CLIPVisionModel layout")

    def t(self, name: str) -> str:
        """Qualified name of a tower module."""
        return self.q(f"{self._tower}{name}")

    def stages(self) -> list[Stage]:
        n = len(self.vm.encoder.layers)
        return (
            [Stage("embeddings", (self.t("embeddings"), self.t("pre_layrnorm")))]
            + [Stage(f"encoder.layers.{i}", (self.t(f"encoder.layers.{i}"),), block=True) for i in range(n)]
            + [Stage("head", tuple(self.head_prefixes()))]
        )

    def head_prefixes(self) -> list[str]:
        return [self.t("post_layernorm")]

    def attn_linear_weights(self) -> list[str]:
        out = []
        for i in range(len(self.vm.encoder.layers)):
            p = self.t(f"encoder.layers.{i}.self_attn")
            out += [f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight", f"{p}.out_proj.weight"]
        return out

    def hidden_size(self) -> int:
        return self.vm.config.hidden_size

    def cls_init(self) -> Tensor:
        """The embedding stage's output at the CLS position: ``pre_layrnorm(class_embedding + P[0])``."""
        e = self.vm.embeddings
        with torch.no_grad():
            v = e.class_embedding + e.position_embedding.weight[0]
            return self.vm.pre_layrnorm(v).detach().clone()

    def reinit_module(self, module: nn.Module) -> None:
        reinit_hf(self.model, module)

    def prepare(self, pixel_values: Tensor, interpolate_pos_encoding: bool | None = False, **kwargs) -> State:
        refuse_arguments(self.arch, kwargs)
        return State(None, {"pixel_values": pixel_values, "interpolate_pos_encoding": bool(interpolate_pos_encoding)})

    def run_stage(self, ctx, i: int, state: State) -> State:
        vm, n = self.vm, len(self.vm.encoder.layers)
        if i == 0:
            kw = {"interpolate_pos_encoding": True} if state.aux["interpolate_pos_encoding"] else {}
            h = ctx.call(vm.embeddings, self.t("embeddings"), state.aux["pixel_values"], **kw)
            return State(ctx.call(vm.pre_layrnorm, self.t("pre_layrnorm"), h), state.aux)
        if i <= n:
            layer = vm.encoder.layers[i - 1]  # CLIPEncoderLayer takes attention_mask positionally (None here)
            return State(ctx.call(layer, self.t(f"encoder.layers.{i - 1}"), state.h, None), state.aux)
        return State(self._head(ctx, state.h), state.aux)

    def _head(self, ctx, h: Dual) -> Dual:
        pooled = dual_map(h, lambda t: t[:, 0, :])
        return ctx.call(self.vm.post_layernorm, self.t("post_layernorm"), pooled)

    def select_output(self, out) -> Tensor:
        return out.pooler_output

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        cfg = self.vm.config
        w = self.vm.embeddings.patch_embedding.weight
        x = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=generator)
        return (x.to(device=w.device, dtype=w.dtype),), {}


@register_family
class CLIPVisionProjectionFamily(CLIPVisionFamily):
    """``CLIPVisionModelWithProjection``: output ``image_embeds = visual_projection(pooler_output)``."""

    arch = "hf-clip-vision-proj"
    model_types = (CLIPVisionModelWithProjection,)
    _tower = "vision_model."

    def head_prefixes(self) -> list[str]:
        return [self.t("post_layernorm"), self.q("visual_projection")]

    def _head(self, ctx, h: Dual) -> Dual:
        pooled = super()._head(ctx, h)
        return ctx.call(self.model.visual_projection, self.q("visual_projection"), pooled)

    def select_output(self, out) -> Tensor:
        return out.image_embeds


def tiny_clip_vision(seed: int = 0, projection: bool = False, **overrides) -> CLIPVisionModel:
    """A small random-init CLIP vision tower (32px, patch 8, width 32, 2 layers, 4 heads, MLP 64), eval mode."""
    torch.manual_seed(seed)
    kw = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, projection_dim=16)
    kw.update(overrides)
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    return cls(CLIPVisionConfig(**kw)).eval()


def load_clip_vision(name: str, pretrained: bool = True) -> CLIPVisionModel:
    """``CLIPVisionModel.from_pretrained(name)`` (or the same config, random-init), eval mode (needs the hub)."""
    if pretrained:
        return CLIPVisionModel.from_pretrained(name).eval()
    return CLIPVisionModel(CLIPVisionConfig.from_pretrained(name)).eval()
