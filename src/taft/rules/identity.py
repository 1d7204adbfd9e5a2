"""Identity-like layers: Identity; Dropout (identity in eval; in training the same mask on both parts)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taft.engine.dual import Dual
from taft.engine.registry import register_rule


@register_rule(nn.Identity)
def identity_rule(ctx, module: nn.Module, name: str, x: Dual, *args, **kwargs) -> Dual:
    return x


@register_rule(nn.Dropout)
def dropout_rule(ctx, module: nn.Dropout, name: str, x: Dual) -> Dual:
    if not module.training or module.p == 0.0:
        return x
    mask = F.dropout(torch.ones_like(x.primal), module.p, training=True)
    return Dual(x.primal * mask, None if x.tangent is None else x.tangent * mask)
