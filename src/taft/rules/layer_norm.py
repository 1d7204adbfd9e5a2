"""LayerNorm over the last dimension.

``x̂ = (x − μ)/σ``, ``σ = √(var(x) + ε)``, ``y = γ·x̂ + β``;
``ẏ = γ/σ·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ)) + γ̇·x̂ + β̇``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taft.engine.dual import Dual, add_tangents
from taft.engine.record import active_recorder
from taft.engine.registry import register_rule
from taft.errors import UnsupportedError


def layer_norm_dual(ctx, x: Dual, gamma: Dual | None, beta: Dual | None, eps: float) -> Dual:
    if not ctx.vjp:
        return _layer_norm_explicit(ctx, x, gamma, beta, eps)
    # The model's own fused kernels: ``native_layer_norm`` for the primal (what ordinary fine-tuning saves for
    # backward, statistics in float32 for low-precision inputs), and for the tangent the LayerNorm backward with
    # no affine weight, which is the same map: ``rstd·(g − mean g − x̂·mean(x̂g))`` is self-adjoint.
    xp = x.primal
    shape = (xp.shape[-1],)
    y, mean, rstd = torch.native_layer_norm(
        xp, shape, None if gamma is None else gamma.primal, None if beta is None else beta.primal, eps
    )
    with torch.no_grad():
        # γ̇·x̂ + β̇ is itself a LayerNorm of x with weight γ̇ and bias β̇: one fused kernel
        g_t = None if gamma is None else gamma.tangent
        b_t = None if beta is None else beta.tangent
        t_p = None
        if g_t is not None:
            t_p = F.layer_norm(xp, shape, g_t, b_t, eps)
        elif b_t is not None:
            t_p = b_t.expand(y.shape)
        t = t_p
        if x.tangent is not None:
            t_x = torch.ops.aten.native_layer_norm_backward(
                x.tangent, xp, shape, mean, rstd, None, None, [True, False, False]
            )[0]
            if gamma is None:
                t = t_x if t_p is None else t_x + t_p
            else:
                t = t_x * gamma.primal if t_p is None else torch.addcmul(t_p, t_x, gamma.primal)
    return Dual(y, t)


def _layer_norm_explicit(ctx, x: Dual, gamma: Dual | None, beta: Dual | None, eps: float) -> Dual:
    """The closed form written out (differentiable through the tangent: ``backward="tangent"``)."""
    xp = x.primal
    mu = xp.mean(-1, keepdim=True)  # (..., 1)
    xc = xp - mu
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    xhat = xc * rstd  # (..., D)
    y = xhat
    if gamma is not None:
        y = y * gamma.primal
    if beta is not None:
        y = y + beta.primal
    with ctx.tangent_mode():
        t_x = None
        if x.tangent is not None:
            dx = x.tangent
            dxhat = rstd * (dx - dx.mean(-1, keepdim=True) - xhat * (xhat * dx).mean(-1, keepdim=True))
            t_x = dxhat if gamma is None else dxhat * gamma.primal
        t_g = None if gamma is None or gamma.tangent is None else xhat * gamma.tangent
        t_b = None if beta is None or beta.tangent is None else beta.tangent.expand(y.shape)
        t = add_tangents(t_x, t_g, t_b)
    return Dual(y, t)


@register_rule(nn.LayerNorm)
def layer_norm_rule(ctx, module: nn.LayerNorm, name: str, x: Dual) -> Dual:
    if len(module.normalized_shape) != 1:
        raise UnsupportedError("layer_norm rule: only normalization over the last dimension")
    gamma = ctx.param(f"{name}.weight") if module.weight is not None else None
    beta = ctx.param(f"{name}.bias") if module.bias is not None else None
    out = layer_norm_dual(ctx, x, gamma, beta, module.eps)
    rec = active_recorder()
    if rec is not None:  # per-example gradient book-keeping (fast DP clipping)
        rec.layer_norm(f"{name}.weight" if gamma is not None else None, f"{name}.bias" if beta is not None else None,
                       x.primal, module.eps, out.primal)
    return out
