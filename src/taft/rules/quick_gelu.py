"""QuickGELU (CLIP): ``g(x) = x·σ(1.702x)``, ``g'(x) = s + 1.702·x·s·(1 − s)`` with ``s = σ(1.702x)``."""

from __future__ import annotations

import torch

from taft.engine.dual import Dual

_K = 1.702


def quick_gelu_dual(ctx, x: Dual) -> Dual:
    s = torch.sigmoid(_K * x.primal)
    y = x.primal * s
    if x.tangent is None:
        return Dual(y, None)
    with ctx.tangent_mode():
        t = (s + _K * x.primal * s * (1.0 - s)) * x.tangent
    return Dual(y, t)
