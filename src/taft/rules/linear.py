"""Linear: ``y = x Wᵀ + b``;  ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taft.engine.context import SharedWeightLinear
from taft.engine.dual import Dual, add_tangents, is_batched
from taft.engine.record import active_recorder
from taft.engine.registry import register_rule


def linear_dual(ctx, x: Dual, w: Dual, b: Dual | None) -> Dual:
    """Functional form, shared by rules whose modules hold raw weight tensors (attention in/out proj)."""
    w_value = w.primal
    parts = ctx.straight_through_parts(w.primal)
    if parts is not None and is_batched(parts[1]) and not is_batched(parts[0]):
        # many models trained together (vmap over stacked Δw, one shared w0): one GEMM over all their rows
        w_value = parts[0]
        y = SharedWeightLinear.apply(x.primal, *parts)
        if b is not None:
            y = y + b.primal
    else:
        y = F.linear(x.primal, w.primal, None if b is None else b.primal)  # (..., out)
    with ctx.tangent_mode():
        bt = None if b is None else b.tangent
        t_w = None
        if w.tangent is not None:
            t_w = F.linear(x.primal, w.tangent, bt)  # x Ẇᵀ + ḃ in one GEMM
        elif bt is not None:
            t_w = bt.expand(y.shape)
        if x.tangent is None:
            t = t_w
        elif w.tangent is not None and not torch.is_grad_enabled() and not is_batched(t_w):
            # ẋWᵀ accumulated by the GEMM itself into x Ẇᵀ + ḃ, a fresh (..., out) tensor: no separate add pass
            t = t_w.view(-1, y.shape[-1]).addmm_(x.tangent.reshape(-1, x.tangent.shape[-1]), w_value.t())
            t = t.view(y.shape)
        else:
            t = add_tangents(F.linear(x.tangent, w_value), t_w)
    return Dual(y, t)


@register_rule(nn.Linear)
def linear_rule(ctx, module: nn.Linear, name: str, x: Dual) -> Dual:
    b = ctx.param(f"{name}.bias") if module.bias is not None else None
    out = linear_dual(ctx, x, ctx.param(f"{name}.weight"), b)
    rec = active_recorder()
    if rec is not None:  # per-example gradient book-keeping (fast DP clipping)
        rec.linear(f"{name}.weight", f"{name}.bias" if b is not None else None, x.primal, out.primal)
    return out
