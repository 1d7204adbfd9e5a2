"""GELU, exact and tanh forms (parameter-free, so ``ẏ = g'(x)·ẋ``).

erf form:  ``g(x) = x·Φ(x)``,  ``g'(x) = Φ(x) + x·φ(x)``.
tanh form: ``u = c·(x + a·x³)``, ``g = ½x(1 + tanh u)``, ``g' = ½(1 + tanh u) + ½x(1 − tanh²u)·c·(1 + 3a·x²)``
with ``c = √(2/π)``, ``a = 0.044715``. Both are smooth at x = 0 (g'(0) = ½).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taft.engine.dual import Dual
from taft.engine.registry import register_rule

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def gelu_grad(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        th = torch.tanh(_C * (x + _A * x.pow(3)))
        return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th.pow(2)) * _C * (1.0 + 3.0 * _A * x.pow(2))
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x.pow(2)) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


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
