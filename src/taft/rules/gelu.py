"""GELU, exact and tanh forms (parameter-free, so ``ẏ = g'(x)·ẋ``).

erf form:  ``g(x) = x·Φ(x)``,  ``g'(x) = Φ(x) + x·φ(x)``.
tanh form: ``u = c·(x + a·x³)``, ``g = ½x(1 + tanh u)``, ``g' = ½(1 + tanh u) + ½x(1 − tanh²u)·c·(1 + 3a·x²)``
with ``c = √(2/π)``, ``a = 0.044715``. Both are smooth at x = 0 (g'(0) = ½). ``g'(x)·ẋ`` is computed by
torch's own GELU backward kernel (one fused pass, float32 internally for half precisions: finite at any |x|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taft.engine.dual import Dual
from taft.engine.registry import register_rule


def gelu_dual(ctx, x: Dual, approximate: str = "none") -> Dual:
    y = F.gelu(x.primal, approximate=approximate)
    if x.tangent is None:
        return Dual(y, None)
    with ctx.tangent_mode():
        # ``g'(x)·ẋ`` in one kernel: GELU's backward applied to ẋ (differentiable, for backward="tangent" too)
        t = torch.ops.aten.gelu_backward(x.tangent, x.primal, approximate=approximate)
    return Dual(y, t)


@register_rule(nn.GELU)
def gelu_rule(ctx, module: nn.GELU, name: str, x: Dual) -> Dual:
    return gelu_dual(ctx, x, module.approximate)
