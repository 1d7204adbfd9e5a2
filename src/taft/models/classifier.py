"""``Classifier``: a backbone, a pooling, optional L2 normalization and a linear head — and its family.

The family appends one stage (pool → normalize → head) to the backbone's stages, so every scope preset works
on classifiers: ``last:1`` is the last block plus the head (the paper's setting), ``head`` is the linear probe.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from taft.engine.dual import Dual, dual_map
from taft.engine.family import Family, Stage, State, family_for, register_family
from taft.errors import TaftError

POOLINGS = ("mean", "cls", "none")


class Classifier(nn.Module):
    """``head(normalize(pool(backbone(x))))``.

    Args:
        backbone: a model of a known family (its family's output is pooled).
        num_classes: outputs of the head.
        pooling: ``mean`` (masked mean over tokens: sentence encoders such as MiniLM), ``cls`` (token 0), or
            ``none`` (the backbone already returns one vector per example).
        normalize: L2-normalize the pooled features (cosine-similarity heads, zero-shot).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, pooling: str = "mean", normalize: bool = False,
                 bias: bool = True, feature_dim: int | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"Classifier(pooling={pooling!r}): expected one of {POOLINGS}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = normalize
        dim = feature_dim or family_for(backbone).hidden_size()
        self.head = nn.Linear(dim, num_classes, bias=bias)

    @torch.no_grad()
    def set_head(self, weight: Tensor | float, bias: Tensor | float = 0.0) -> None:
        """Overwrite the head (a zero-shot classifier, zeros, a probed head)."""
        self.head.weight.copy_(torch.as_tensor(weight, dtype=self.head.weight.dtype).expand_as(self.head.weight))
        if self.head.bias is not None:
            self.head.bias.copy_(torch.as_tensor(bias, dtype=self.head.bias.dtype).expand_as(self.head.bias))

    def features(self, *args, **kwargs) -> Tensor:
        h = family_for(self.backbone).select_output(self.backbone(*args, **kwargs))
        f = pool(h, backbone_mask(self.backbone, args, kwargs), self.pooling)
        return nn.functional.normalize(f, dim=-1) if self.normalize else f

    def forward(self, *args, **kwargs) -> Tensor:
        return self.head(self.features(*args, **kwargs))


def backbone_mask(backbone: nn.Module, args: tuple, kwargs: dict) -> Tensor | None:
    """The ``attention_mask`` the backbone is called with, by keyword or by position in its forward's signature."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    try:
        bound = inspect.signature(backbone.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):  # no signature, or the call itself is invalid (the backbone will say why)
        return None
    return bound.arguments.get("attention_mask")


def pool(h: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    if pooling == "none":
        return h
    if pooling == "cls":
        return h[:, 0]
    if mask is None:
        return h.mean(1)
    if mask.shape != h.shape[:2]:
        raise TaftError(f"Classifier(pooling='mean'): attention_mask has shape {tuple(mask.shape)}, expected "
                        f"(batch, tokens) = {tuple(h.shape[:2])}; pass the 2-D padding mask or use pooling='cls'")
    m = mask[..., None].to(h.dtype)  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def l2_normalize_dual(ctx, x: Dual) -> Dual:
    """``y = x/‖x‖``, ``ẏ = (ẋ − y·⟨y, ẋ⟩)/‖x‖``."""
    norm = x.primal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    y = x.primal / norm
    if x.tangent is None:
        return Dual(y, None)
    with ctx.tangent_mode():
        t = (x.tangent - y * (y * x.tangent).sum(-1, keepdim=True)) / norm
    return Dual(y, t)


_POOL_MASK = "classifier.pool_mask"  # the backbone's padding mask, as the classifier's pooling sees it


@register_family
class ClassifierFamily(Family):
    model_types = (Classifier,)

    def __init__(self, model: Classifier, root: str = "") -> None:
        super().__init__(model, root)
        self.inner = family_for(model.backbone, root=f"{root}backbone.")
        self.arch = f"classifier/{self.inner.arch}"

    def stages(self) -> list[Stage]:
        return [*self.inner.stages(), Stage("head", (self.q("head"),))]

    def head_prefixes(self) -> list[str]:
        return [*self.inner.head_prefixes(), self.q("head")]

    def head_only(self) -> list[str]:
        return [self.q("head")]

    def blocks(self) -> list[Stage]:
        return self.inner.blocks()

    def no_blocks(self) -> str:
        return self.inner.no_blocks()

    def changed(self) -> str | None:
        return super().changed() or self.inner.changed()

    def attn_linear_weights(self) -> list[str]:
        return self.inner.attn_linear_weights()

    def hidden_size(self) -> int:
        return self.inner.hidden_size()

    def cls_init(self) -> Tensor:
        return self.inner.cls_init()

    def reinit_module(self, module: nn.Module) -> None:
        self.inner.reinit_module(module)

    def prepare(self, *args, **kwargs) -> State:
        state = self.inner.prepare(*args, **kwargs)
        return State(state.h, {**state.aux, _POOL_MASK: backbone_mask(self.model.backbone, args, kwargs)})

    def run_stage(self, ctx, i: int, state: State) -> State:
        n = len(self.inner.stages())
        if i < n:
            return self.inner.run_stage(ctx, i, state)
        m: Classifier = self.model
        h = self.inner.output(state)
        f = dual_map(h, lambda x: pool(x, state.aux[_POOL_MASK], m.pooling))
        if m.normalize:
            f = l2_normalize_dual(ctx, f)
        return State(ctx.call(m.head, self.q("head"), f), state.aux)

    def select_output(self, out) -> Tensor:
        return out

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        return self.inner.example_inputs(batch, generator)
