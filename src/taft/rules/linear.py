"""Linear: ``y = x Wᵀ + b``;  ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from taft.engine.dual import Dual, add_tangents
from taft.engine.registry import register_rule


def linear_dual(ctx, x: Dual, w: Dual, b: Dual | None) -> Dual:
    """Functional form, shared by rules whose modules hold raw weight tensors (attention in/out proj)."""
    y = F.linear(x.primal, w.primal, None if b is None else b.primal)  # (..., out)
    with ctx.tangent_mode():
        bt = None if b is None else b.tangent
        t_x = None if x.tangent is None else F.linear(x.tangent, w.primal)
        if w.tangent is not None:
            t_w = F.linear(x.primal, w.tangent, bt)  # x Ẇᵀ + ḃ in one GEMM
        elif bt is not None:
            t_w = bt.expand(y.shape)
        else:
            t_w = None
        t = add_tangents(t_x, t_w)
    return Dual(y, t)


@register_rule(nn.Linear)
def linear_rule(ctx, module: nn.Linear, name: str, x: Dual) -> Dual:
    b = ctx.param(f"{name}.bias") if module.bias is not None else None
    return linear_dual(ctx, x, ctx.param(f"{name}.weight"), b)
