"""open_clip ``VisionTransformer`` (the ``.visual`` tower of ``open_clip.create_model('ViT-*')``): rules and family.

Embeddings ``e = ln_pre([c; Conv(x)ᵀ] + P)``; blocks (``ResidualAttentionBlock``, ``nn.MultiheadAttention``)
``a = x + LS₁(MHA(LN₁(x)))``, ``y = a + LS₂(c_proj(act(c_fc(LN₂(a)))))``; output
``pooled @ proj`` with ``pooled = pool(ln_post(h))`` (or ``ln_post(pool(h))`` when ``final_ln_after_pool``),
pool = CLS token (``tok``), mean of the patch tokens (``avg``) or every token (``none``). With
``output_tokens=True`` the model returns ``(pooled, tokens)``; the family computes ``pooled``.

Not supported (:class:`~taft.errors.UnsupportedError`): attentional pooling (CoCa), cross-attention blocks,
patch dropout in training. Custom blocks (``qk_norm``, scaled-cosine attention, ...) have no rule and run the
jvp fallback.
"""

from __future__ import annotations

import torch
from open_clip import transformer as oct
from torch import Tensor, nn

from taft.engine.dual import Dual, add_tangents, dual_add, dual_cat, dual_map
from taft.engine.family import Family, Stage, State, register_family
from taft.engine.registry import register_rule
from taft.errors import UnsupportedError
from taft.models.timm_vit import layer_scale_dual, timm_layer_norm_fp32_rule
from taft.rules.layer_norm import layer_norm_rule
from taft.rules.quick_gelu import quick_gelu_dual


def _matmul(ctx, x: Dual, w: Dual) -> Dual:
    """``y = x @ W``: ``ẏ = ẋ @ W + x @ Ẇ``."""
    y = x.primal @ w.primal
    with ctx.tangent_mode():
        t = add_tangents(
            None if x.tangent is None else x.tangent @ w.primal,
            None if w.tangent is None else x.primal @ w.tangent,
        )
    return Dual(y, t)


# -- rules --------------------------------------------------------------------------------------------------
@register_rule(oct.LayerNorm)
def open_clip_layer_norm_rule(ctx, m: oct.LayerNorm, name: str, x: Dual) -> Dual:
    """open_clip LayerNorm (``F.layer_norm`` then a cast back to the input dtype, a no-op when the weights share
    it): ``ẏ = γ/σ·(ẋ − mean ẋ − x̂·mean(x̂ẋ)) + γ̇·x̂ + β̇``. Registered explicitly because the subclass
    overrides ``forward`` (the registry then ignores the ``nn.LayerNorm`` rule)."""
    return layer_norm_rule(ctx, m, name, x)


@register_rule(oct.LayerNormFp32)
def open_clip_layer_norm_fp32_rule(ctx, m, name: str, x: Dual) -> Dual:
    """LayerNorm computed in float32 and cast back: the LayerNorm closed form on ``x.float()`` (tangent too)."""
    return timm_layer_norm_fp32_rule(ctx, m, name, x)


@register_rule(oct.QuickGELU)
def open_clip_quick_gelu_rule(ctx, m, name: str, x: Dual) -> Dual:
    """QuickGELU ``x·σ(1.702x)``: ``ẏ = (s + 1.702·x·s(1 − s))·ẋ``, ``s = σ(1.702x)``."""
    return quick_gelu_dual(ctx, x)


@register_rule(oct.LayerScale)
def open_clip_layer_scale_rule(ctx, m, name: str, x: Dual) -> Dual:
    """LayerScale ``y = x ⊙ γ``: ``ẏ = ẋ ⊙ γ + x ⊙ γ̇`` (computed out of place even when ``inplace``)."""
    return layer_scale_dual(ctx, x, ctx.param(f"{name}.gamma"))


@register_rule(oct.PatchDropout)
def open_clip_patch_dropout_rule(ctx, m, name: str, x: Dual) -> Dual:
    """Patch dropout: identity in eval (``ẏ = ẋ``); random token dropping in training is not supported."""
    if not m.training or m.prob == 0.0:
        return x
    raise UnsupportedError("open_clip PatchDropout rule: patch dropout in training mode is not supported; "
                           "call model.eval() (or set the dropout to 0) before the tangent forward")


@register_rule(oct.ResidualAttentionBlock, methods=("forward", "attention"), bypassed=("mlp",))
def open_clip_block_rule(ctx, m: oct.ResidualAttentionBlock, name: str, q_x: Dual, k_x=None, v_x=None,
                         attn_mask: Tensor | None = None) -> Dual:
    """``a = x + LS₁(MHA(LN₁(x)))``, ``y = a + LS₂(mlp(LN₂(a)))``, every sub-module through its own rule (the
    MLP ``Sequential`` child by child); residual adds are linear. Layout-agnostic: the MHA rule handles
    ``batch_first``. ``attn_mask`` is cast to the input dtype first, as open_clip does."""
    if k_x is not None or v_x is not None:
        raise UnsupportedError("open_clip block rule: cross-attention (k_x / v_x) is not supported")
    a = ctx.call(m.ln_1, f"{name}.ln_1", q_x)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q_x.primal.dtype)
    a = ctx.call(m.attn, f"{name}.attn", a, a, a, need_weights=False, attn_mask=attn_mask)
    x = dual_add(q_x, ctx.call(m.ls_1, f"{name}.ls_1", a))
    b = ctx.call(m.ln_2, f"{name}.ln_2", x)
    for child_name, child in m.mlp.named_children():
        b = ctx.call(child, f"{name}.mlp.{child_name}", b)
    return dual_add(x, ctx.call(m.ls_2, f"{name}.ls_2", b))


# -- family -------------------------------------------------------------------------------------------------
@register_family
class OpenCLIPViTFamily(Family):
    """open_clip ``VisionTransformer``; output: the image embedding (the pooled one when it returns tokens)."""

    arch = "open-clip-vit"
    model_types = (oct.VisionTransformer,)
    own_methods = ("forward", "_embeds", "_pool", "_global_pool")

    @classmethod
    def bypassed(cls, model: nn.Module) -> dict[str, tuple[type, ...]]:
        return {"transformer": (oct.Transformer,)}  # its resblocks are called one by one

    def __init__(self, model: nn.Module, root: str = "") -> None:
        super().__init__(model, root)
        if model.attn_pool is not None:
            raise UnsupportedError("open_clip ViT family: attentional pooling (CoCa) is not supported")
        if model.pool_type not in ("tok", "avg", "none"):
            raise UnsupportedError(f"open_clip ViT family: pool_type={model.pool_type!r} is not supported")

    def _blocks(self) -> nn.ModuleList:
        return self.model.transformer.resblocks

    def stages(self) -> list[Stage]:
        n = len(self._blocks())
        embed = tuple(self.q(p) for p in ("conv1", "class_embedding", "positional_embedding", "ln_pre"))
        return (
            [Stage("embed", embed)]
            + [Stage(f"transformer.resblocks.{i}", (self.q(f"transformer.resblocks.{i}"),), block=True)
               for i in range(n)]
            + [Stage("head", tuple(self.head_prefixes()))]
        )

    def head_prefixes(self) -> list[str]:
        return [self.q("ln_post"), self.q("proj")]

    def attn_linear_weights(self) -> list[str]:
        out = []
        for i in range(len(self._blocks())):
            p = self.q(f"transformer.resblocks.{i}.attn")
            out += [f"{p}.in_proj_weight", f"{p}.out_proj.weight"]
        return out

    def hidden_size(self) -> int:
        return self.model.transformer.width

    def cls_init(self) -> Tensor:
        """The embedding stage's output at the CLS position: ``ln_pre(class_embedding + P[0])``."""
        m = self.model
        with torch.no_grad():
            return m.ln_pre(m.class_embedding + m.positional_embedding[0]).detach().clone()

    def reinit_module(self, module: nn.Module) -> None:
        """open_clip leaves the visual tower at PyTorch's default init: ``reset_parameters`` of every Linear /
        LayerNorm, then ``nn.MultiheadAttention``'s own (xavier in_proj, zero biases). LayerScale keeps γ (open_clip
        does not record its init value)."""
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for m in module.modules():
            if isinstance(m, nn.MultiheadAttention):
                m._reset_parameters()

    def prepare(self, x: Tensor) -> State:
        return State(None, {"x": x})

    def run_stage(self, ctx, i: int, state: State) -> State:
        m, n = self.model, len(self._blocks())
        if i == 0:
            return State(self._embed(ctx, state.aux["x"]), state.aux)
        if i <= n:
            h = state.h
            if not m.transformer.batch_first:  # Transformer.forward works in (L, N, D)
                h = dual_map(h, lambda t: t.transpose(0, 1))
            h = ctx.call(self._blocks()[i - 1], self.q(f"transformer.resblocks.{i - 1}"), h)
            if not m.transformer.batch_first:
                h = dual_map(h, lambda t: t.transpose(0, 1))
            return State(h, state.aux)
        return State(self._head(ctx, state.h), state.aux)

    def _embed(self, ctx, x: Tensor) -> Dual:
        m = self.model
        h = ctx.call(m.conv1, self.q("conv1"), Dual(x, None))  # (B, D, g, g)
        h = dual_map(h, lambda t: t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1))  # (B, N, D)
        B, dt = h.primal.shape[0], h.primal.dtype
        c = dual_map(ctx.param(self.q("class_embedding")), lambda t: t.view(1, 1, -1).expand(B, -1, -1).to(dt))
        h = dual_cat([c, h], 1)
        h = dual_add(h, dual_map(ctx.param(self.q("positional_embedding")), lambda t: t.to(dt)))
        h = ctx.call(m.patch_dropout, self.q("patch_dropout"), h)
        return ctx.call(m.ln_pre, self.q("ln_pre"), h)

    def _pool(self, h: Dual) -> Dual:
        if self.model.pool_type == "avg":
            return dual_map(h, lambda t: t[:, 1:].mean(dim=1))
        if self.model.pool_type == "tok":
            return dual_map(h, lambda t: t[:, 0])
        return h

    def _head(self, ctx, h: Dual) -> Dual:
        m = self.model
        if m.final_ln_after_pool:
            pooled = ctx.call(m.ln_post, self.q("ln_post"), self._pool(h))
        else:
            pooled = self._pool(ctx.call(m.ln_post, self.q("ln_post"), h))
        if m.proj is not None:
            pooled = _matmul(ctx, pooled, ctx.param(self.q("proj")))
        return pooled

    def select_output(self, out) -> Tensor:
        return out[0] if isinstance(out, tuple) else out

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        w = self.model.conv1.weight
        H, W = self.model.image_size
        x = torch.randn(batch, w.shape[1], H, W, generator=generator)
        return (x.to(device=w.device, dtype=w.dtype),), {}


# -- builders -----------------------------------------------------------------------------------------------
def tiny_open_clip_vit(seed: int = 0, **overrides) -> oct.VisionTransformer:
    """A small random-init open_clip ViT (32px, patch 8, width 32, 2 layers, 4 heads, mlp ratio 2, output 16)."""
    torch.manual_seed(seed)
    kw = dict(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)
    kw.update(overrides)
    return oct.VisionTransformer(**kw).eval()


def load_open_clip(name: str, pretrained: bool | str = True) -> nn.Module:
    """``open_clip.create_model(name, pretrained=tag)`` (image and text towers) in eval mode (needs the hub for
    weights).

    ``name`` may carry the tag as ``"ViT-B-32:openai"``; ``pretrained=True`` without one takes open_clip's first
    listed tag for the architecture; a string is the tag itself; ``False`` gives a random-init model.
    ``hf-hub:`` names load their own weights."""
    import open_clip

    arch, _, tag = name.partition(":")
    if name.startswith("hf-hub:"):
        arch, tag = name, None
    elif pretrained is False:
        tag = None
    elif isinstance(pretrained, str):
        tag = pretrained
    elif not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            raise ValueError(f"load_open_clip: open_clip has no pretrained weights for {arch!r}")
        tag = tags[0]
    return open_clip.create_model(arch, pretrained=tag).eval()


def load_open_clip_vit(name: str, pretrained: bool | str = True) -> nn.Module:
    """The visual tower of :func:`load_open_clip` (same naming rules), in eval mode."""
    return load_open_clip(name, pretrained).visual.eval()
