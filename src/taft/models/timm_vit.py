"""timm ``VisionTransformer`` (``vit_*``, DeiT-3, CLIP-style pre-norm ViTs, register tokens): rules and family.

Pre-LN blocks: ``a = x + DP(LS₁(W_proj·MHA(LN₁(x))))``, ``y = a + DP(LS₂(Mlp(LN₂(a))))``. The embedding
stage is ``norm_pre(pos_drop([cls; reg; PatchEmbed(x)] + pos))`` (``no_embed_class``: the position embedding is
added to the patches before the prefix tokens are prepended); the final stage is ``norm`` → pool (``token``,
``avg`` or none) → ``fc_norm`` → ``head`` (Identity when ``num_classes=0``), i.e. exactly ``model(x)``.

Not supported (:class:`~taft.errors.UnsupportedError` in the family constructor): ``dynamic_img_size``,
attention pooling (``global_pool='map'``/``'prr'``), ``avgmax``/``max`` pooling. Subclasses of
``VisionTransformer`` that change the forward (e.g. distilled DeiT) are left to the generic fallback family.
Gated attention and attention dropout in training raise in the attention rule.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp, PatchEmbed
from timm.layers import activations as timm_act
from timm.layers import norm as timm_norm
from timm.layers.attention import Attention
from timm.layers.drop import DropPath
from timm.layers.format import Format
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from taft.engine.dual import Dual, as_dual, dual_add, dual_cat, dual_map
from taft.engine.family import Family, Stage, State, register_family
from taft.engine.registry import register_rule
from taft.errors import UnsupportedError
from taft.rules.attention import attention_dual, to_additive
from taft.rules.gelu import gelu_dual
from taft.rules.layer_norm import layer_norm_dual, layer_norm_rule
from taft.rules.quick_gelu import quick_gelu_dual

try:  # timm >= 1.0.x
    from timm.layers.patch_dropout import PatchDropout
except ImportError:  # pragma: no cover
    PatchDropout = None


# -- helpers ----------------------------------------------------------------------------------------------



# -- rules --------------------------------------------------------------------------------------------------
@register_rule(timm_norm.LayerNorm)
def timm_layer_norm_rule(ctx, m: timm_norm.LayerNorm, name: str, x: Dual) -> Dual:
    """timm LayerNorm (``F.layer_norm``, or the same maths through apex/fast-norm): the LayerNorm closed form
    ``ẏ = γ/σ·(ẋ − mean ẋ − x̂·mean(x̂ẋ)) + γ̇·x̂ + β̇``."""
    return layer_norm_rule(ctx, m, name, x)


@register_rule(timm_norm.LayerNormFp32)
def timm_layer_norm_fp32_rule(ctx, m, name: str, x: Dual) -> Dual:
    """LayerNorm computed in float32 and cast back: the LayerNorm closed form on ``x.float()`` (tangent too)."""
    if len(m.normalized_shape) != 1:
        raise UnsupportedError("timm LayerNormFp32 rule: only normalization over the last dimension")
    dt = x.primal.dtype
    x32 = Dual(x.primal.float(), None if x.tangent is None else x.tangent.float())

    def f32(n):
        d = ctx.param(f"{name}.{n}")
        return Dual(d.primal.float(), None if d.tangent is None else d.tangent.float())

    y = layer_norm_dual(ctx, x32, f32("weight") if m.weight is not None else None,
                        f32("bias") if m.bias is not None else None, m.eps)
    return dual_map(y, lambda t: t.to(dt))


@register_rule(timm_act.GELU)
def timm_gelu_rule(ctx, m, name: str, x: Dual) -> Dual:
    """erf GELU: ``ẏ = (Φ(x) + x·φ(x))·ẋ``."""
    return gelu_dual(ctx, x, "none")


@register_rule(timm_act.GELUTanh)
def timm_gelu_tanh_rule(ctx, m, name: str, x: Dual) -> Dual:
    """tanh GELU: ``ẏ = g'(x)·ẋ`` with the tanh-form derivative (see :mod:`taft.rules.gelu`)."""
    return gelu_dual(ctx, x, "tanh")


@register_rule(timm_act.QuickGELU)
def timm_quick_gelu_rule(ctx, m, name: str, x: Dual) -> Dual:
    """QuickGELU ``x·σ(1.702x)``: ``ẏ = (s + 1.702·x·s(1 − s))·ẋ``, ``s = σ(1.702x)``."""
    return quick_gelu_dual(ctx, x)


def layer_scale_dual(ctx, x: Dual, gamma: Dual) -> Dual:
    """``y = x ⊙ γ`` (γ broadcast over the last dim): ``ẏ = ẋ ⊙ γ + x ⊙ γ̇``."""
    y = x.primal * gamma.primal
    with ctx.tangent_mode():
        t_x = None if x.tangent is None else x.tangent * gamma.primal
        t_g = None if gamma.tangent is None else x.primal * gamma.tangent
        t = t_x if t_g is None else (t_g if t_x is None else t_x + t_g)
    return Dual(y, t)


@register_rule(LayerScale)
def timm_layer_scale_rule(ctx, m: LayerScale, name: str, x: Dual) -> Dual:
    """LayerScale ``y = x ⊙ γ``: ``ẏ = ẋ ⊙ γ + x ⊙ γ̇`` (computed out of place even when ``inplace``)."""
    return layer_scale_dual(ctx, x, ctx.param(f"{name}.gamma"))


@register_rule(DropPath)
def timm_drop_path_rule(ctx, m: DropPath, name: str, x: Dual) -> Dual:
    """Stochastic depth: identity in eval; in training ``y = x ⊙ r`` with one per-sample Bernoulli mask ``r``
    (scaled by 1/keep) shared by primal and tangent, ``ẏ = ẋ ⊙ r``."""
    if not m.training or m.drop_prob == 0.0:
        return x
    keep = 1.0 - m.drop_prob
    r = x.primal.new_empty((x.primal.shape[0],) + (1,) * (x.primal.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and m.scale_by_keep:
        r.div_(keep)
    return Dual(x.primal * r, None if x.tangent is None else x.tangent * r)


if PatchDropout is not None:

    @register_rule(PatchDropout)
    def timm_patch_dropout_rule(ctx, m, name: str, x: Dual) -> Dual:
        """Patch dropout: identity in eval (``ẏ = ẋ``); random token dropping in training is not supported."""
        if not m.training or m.prob == 0.0:
            return x
        raise UnsupportedError("timm PatchDropout rule: patch dropout in training mode is not supported; "
                               "call model.eval() (or set the dropout to 0) before the tangent forward")


@register_rule(PatchEmbed)
def timm_patch_embed_rule(ctx, m: PatchEmbed, name: str, x) -> Dual:
    """``y = norm(flatten(conv(x, W) + b))``: the Conv2d rule, a linear reshape (B, D, h, w) → (B, h·w, D), then
    the norm's rule. ``dynamic_img_pad`` zero-pads the input first (linear)."""
    x = as_dual(x)
    B, C, H, W = x.primal.shape
    if m.img_size is not None:
        if m.strict_img_size:
            if tuple(m.img_size) != (H, W):
                raise ValueError(f"Input size ({H}*{W}) doesn't match model ({m.img_size[0]}*{m.img_size[1]}).")
        elif not m.dynamic_img_pad and (H % m.patch_size[0] or W % m.patch_size[1]):
            raise ValueError(f"Input size ({H}*{W}) should be divisible by patch size {m.patch_size}.")
    if m.dynamic_img_pad:
        pad_h = (m.patch_size[0] - H % m.patch_size[0]) % m.patch_size[0]
        pad_w = (m.patch_size[1] - W % m.patch_size[1]) % m.patch_size[1]
        x = dual_map(x, lambda t: F.pad(t, (0, pad_w, 0, pad_h)))
    h = ctx.call(m.proj, f"{name}.proj", x)  # (B, D, h, w)
    if m.flatten:
        h = dual_map(h, lambda t: t.flatten(2).transpose(1, 2))  # (B, h·w, D)
    elif m.output_fmt != Format.NCHW:
        raise UnsupportedError(f"timm PatchEmbed rule: output_fmt={m.output_fmt} is not supported")
    return ctx.call(m.norm, f"{name}.norm", h)


def _self_attn_mask(N: int, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """timm's ``resolve_self_attn_mask`` (SDPA semantics: bool True = attend; float masks are added)."""
    if is_causal:
        return x.new_full((N, N), float("-inf")).triu_(1)
    return to_additive(attn_mask, x.dtype)


@register_rule(Attention)
def timm_attention_rule(ctx, m: Attention, name: str, x: Dual, attn_mask: Tensor | None = None,
                        is_causal: bool = False) -> Dual:
    """Fused-qkv self-attention: ``[Q K V] = x W_qkvᵀ + b`` (Linear rule), ``Q, K = q_norm(Q), k_norm(K)``,
    ``O = softmax(s·QKᵀ + M)V`` (:func:`attention_dual`, ``s = d^-½``), ``y = proj(norm(O))`` (Linear rule).
    The same maths whether timm runs SDPA (``fused_attn``) or the explicit path."""
    if getattr(m, "gate", None) is not None:
        raise UnsupportedError("timm attention rule: gated attention is not supported")
    if m.training and m.attn_drop.p > 0.0:
        raise UnsupportedError("timm attention rule: attention dropout in training mode is not supported; "
                               "call model.eval() (or set the dropout to 0) before the tangent forward")
    B, N, _ = x.primal.shape
    nh, hd = m.num_heads, m.head_dim
    attn_dim = getattr(m, "attn_dim", nh * hd)
    qkv = ctx.call(m.qkv, f"{name}.qkv", x)  # (B, N, 3·h·d)
    qkv = dual_map(qkv, lambda t: t.reshape(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4))  # (3, B, h, N, d)
    q, k, v = (dual_map(qkv, lambda t, i=i: t[i]) for i in range(3))
    q = ctx.call(m.q_norm, f"{name}.q_norm", q)
    k = ctx.call(m.k_norm, f"{name}.k_norm", k)
    mask = _self_attn_mask(N, x.primal, attn_mask, is_causal)
    o = attention_dual(ctx, q, k, v, scale=m.scale, mask=mask)  # (B, h, N, d)
    o = dual_map(o, lambda t: t.transpose(1, 2).reshape(B, N, attn_dim))
    if getattr(m, "norm", None) is not None:
        o = ctx.call(m.norm, f"{name}.norm", o)
    o = ctx.call(m.proj, f"{name}.proj", o)
    return ctx.call(m.proj_drop, f"{name}.proj_drop", o)


@register_rule(Mlp)
def timm_mlp_rule(ctx, m: Mlp, name: str, x: Dual) -> Dual:
    """``y = fc2(norm(act(fc1(x))))`` (dropouts identity in eval): Linear, activation and norm rules chained."""
    if not isinstance(m.fc1, nn.Linear):
        raise UnsupportedError("timm Mlp rule: use_conv=True (1x1 conv MLP) is not supported")
    h = ctx.call(m.fc1, f"{name}.fc1", x)
    h = ctx.call(m.act, f"{name}.act", h)
    h = ctx.call(m.drop1, f"{name}.drop1", h)
    h = ctx.call(m.norm, f"{name}.norm", h)
    h = ctx.call(m.fc2, f"{name}.fc2", h)
    return ctx.call(m.drop2, f"{name}.drop2", h)


def _mask_kwargs(attn_mask, is_causal) -> dict:
    kw = {}
    if attn_mask is not None:
        kw["attn_mask"] = attn_mask
    if is_causal:
        kw["is_causal"] = True
    return kw


@register_rule(Block)
def timm_block_rule(ctx, m: Block, name: str, x: Dual, attn_mask: Tensor | None = None,
                    is_causal: bool = False) -> Dual:
    """Pre-LN block ``a = x + DP₁(LS₁(attn(LN₁(x))))``, ``y = a + DP₂(LS₂(mlp(LN₂(a))))``; residual adds are
    linear (``ȧ = ẋ + ...``), every sub-module through its own rule."""
    a = ctx.call(m.norm1, f"{name}.norm1", x)
    a = ctx.call(m.attn, f"{name}.attn", a, **_mask_kwargs(attn_mask, is_causal))
    a = ctx.call(m.ls1, f"{name}.ls1", a)
    x = dual_add(x, ctx.call(m.drop_path1, f"{name}.drop_path1", a))
    b = ctx.call(m.norm2, f"{name}.norm2", x)
    b = ctx.call(m.mlp, f"{name}.mlp", b)
    b = ctx.call(m.ls2, f"{name}.ls2", b)
    return dual_add(x, ctx.call(m.drop_path2, f"{name}.drop_path2", b))


# -- family -------------------------------------------------------------------------------------------------
_POOLS = ("", "token", "avg")


@register_family
class TimmViTFamily(Family):
    """timm ``VisionTransformer`` (exact class). Output: ``model(x)`` — logits, or pooled features when
    ``num_classes=0`` (all tokens when ``global_pool=''``)."""

    arch = "timm-vit"
    model_types = (VisionTransformer,)
    # Subclasses that change any of these (distilled DeiT, ...) go to the generic fallback family.
    own_methods = ("forward", "forward_features", "forward_head", "_pos_embed", "pool")

    @classmethod
    def bypassed(cls, model: nn.Module) -> dict[str, tuple[type, ...]]:
        return {"blocks": (nn.Sequential,)}  # its blocks are called one by one

    def __init__(self, model: nn.Module, root: str = "") -> None:
        super().__init__(model, root)
        self._check()

    def _check(self) -> None:
        m = self.model
        if getattr(m, "dynamic_img_size", False):
            raise UnsupportedError("timm ViT family: dynamic_img_size=True is not supported")
        if getattr(m, "attn_pool", None) is not None:
            raise UnsupportedError(
                f"timm ViT family: attention pooling (global_pool={m.global_pool!r}) is not supported"
            )
        if m.global_pool not in _POOLS:
            raise UnsupportedError(
                f"timm ViT family: global_pool={m.global_pool!r} is not supported (supported: {_POOLS})"
            )

    # -- structure --------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        n = len(self.model.blocks)
        embed = tuple(self.q(p) for p in ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre"))
        return (
            [Stage("embed", embed)]
            + [Stage(f"blocks.{i}", (self.q(f"blocks.{i}"),), block=True) for i in range(n)]
            + [Stage("head", tuple(self.head_prefixes()))]
        )

    def head_prefixes(self) -> list[str]:
        return [self.q("norm"), self.q("fc_norm"), self.q("head")]

    def attn_linear_weights(self) -> list[str]:
        out = []
        for i in range(len(self.model.blocks)):
            out += [self.q(f"blocks.{i}.attn.qkv.weight"), self.q(f"blocks.{i}.attn.proj.weight")]
        return out

    def hidden_size(self) -> int:
        return self.model.embed_dim

    def cls_init(self) -> Tensor:
        """The embedding stage's output at the CLS position: ``norm_pre(cls + pos[0])``."""
        m = self.model
        if m.cls_token is None:
            raise UnsupportedError("timm ViT family: linearize_cls needs a model with a class token")
        with torch.no_grad():
            v = m.cls_token.reshape(1, 1, -1)
            if m.pos_embed is not None and not m.no_embed_class:
                v = v + m.pos_embed[:, :1]
            return m.norm_pre(v)[0, 0].detach().clone()

    def reinit_module(self, module: nn.Module) -> None:
        """timm's own ViT init (``get_init_weights_vit`` for the model's ``weight_init_mode``), per sub-module."""
        from timm.models._manipulate import named_apply
        from timm.models.vision_transformer import get_init_weights_vit

        mode = getattr(self.model, "weight_init_mode", "") or ""
        if "needs_reset" in inspect.signature(get_init_weights_vit).parameters:
            fn = get_init_weights_vit(mode, needs_reset=True)
        else:  # pragma: no cover - older timm
            fn = get_init_weights_vit(mode)
        named_apply(fn, module)

    # -- forward ----------------------------------------------------------------------------------------
    def prepare(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> State:
        self._check()
        return State(None, {"x": x, "attn_mask": attn_mask, "is_causal": is_causal})

    def run_stage(self, ctx, i: int, state: State) -> State:
        m, n = self.model, len(self.model.blocks)
        if i == 0:
            return State(self._embed(ctx, state.aux["x"]), state.aux)
        if i <= n:
            kw = _mask_kwargs(state.aux["attn_mask"], state.aux["is_causal"])
            return State(ctx.call(m.blocks[i - 1], self.q(f"blocks.{i - 1}"), state.h, **kw), state.aux)
        return State(self._head(ctx, state.h), state.aux)

    def _embed(self, ctx, x: Tensor) -> Dual:
        m = self.model
        h = ctx.call(m.patch_embed, self.q("patch_embed"), Dual(x, None))  # (B, N, D)
        B = h.primal.shape[0]
        prefix = []
        if m.cls_token is not None:
            prefix.append(dual_map(ctx.param(self.q("cls_token")), lambda t: t.expand(B, -1, -1)))
        if m.reg_token is not None:
            prefix.append(dual_map(ctx.param(self.q("reg_token")), lambda t: t.expand(B, -1, -1)))
        if m.pos_embed is None:
            h = dual_cat([*prefix, h], 1)
        elif m.no_embed_class:
            h = dual_add(h, ctx.param(self.q("pos_embed")))
            h = dual_cat([*prefix, h], 1) if prefix else h
        else:
            h = dual_cat([*prefix, h], 1) if prefix else h
            h = dual_add(h, ctx.param(self.q("pos_embed")))
        h = ctx.call(m.pos_drop, self.q("pos_drop"), h)
        h = ctx.call(m.patch_drop, self.q("patch_drop"), h)
        return ctx.call(m.norm_pre, self.q("norm_pre"), h)

    def _head(self, ctx, h: Dual) -> Dual:
        m = self.model
        h = ctx.call(m.norm, self.q("norm"), h)
        if m.global_pool == "token":
            h = dual_map(h, lambda t: t[:, 0])
        elif m.global_pool == "avg":
            start = 0 if m.pool_include_prefix else m.num_prefix_tokens
            h = dual_map(h, lambda t: t[:, start:].mean(dim=1))
        h = ctx.call(m.fc_norm, self.q("fc_norm"), h)
        h = ctx.call(m.head_drop, self.q("head_drop"), h)
        return ctx.call(m.head, self.q("head"), h)

    # -- the model's own forward --------------------------------------------------------------------------
    def select_output(self, out) -> Tensor:
        return out

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        m = self.model
        w = m.patch_embed.proj.weight
        H, W = m.patch_embed.img_size
        x = torch.randn(batch, m.patch_embed.proj.in_channels, H, W, generator=generator)
        return (x.to(device=w.device, dtype=w.dtype),), {}


# -- builders -----------------------------------------------------------------------------------------------
def tiny_timm_vit(seed: int = 0, **overrides) -> VisionTransformer:
    """A small random-init timm ViT (32px, patch 8, width 32, depth 2, 4 heads, mlp ratio 2, 10 classes), eval."""
    torch.manual_seed(seed)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=10)
    kw.update(overrides)
    return VisionTransformer(**kw).eval()


def load_timm_vit(name: str, pretrained: bool = True) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained)`` in eval mode (needs the hub for weights)."""
    import timm

    return timm.create_model(name, pretrained=pretrained).eval()
