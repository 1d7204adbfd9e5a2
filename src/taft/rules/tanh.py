"""Tanh (BERT/ViT poolers): ``y = tanh x``, ``ẏ = (1 − y²)·ẋ``."""

from __future__ import annotations

import torch
from torch import nn

from taft.engine.dual import Dual
from taft.engine.registry import register_rule


@register_rule(nn.Tanh)
def tanh_rule(ctx, module: nn.Tanh, name: str, x: Dual) -> Dual:
    y = torch.tanh(x.primal)
    if x.tangent is None:
        return Dual(y, None)
    with ctx.tangent_mode():
        t = (1.0 - y.pow(2)) * x.tangent
    return Dual(y, t)
