"""Embedding lookup: ``y = W[i]``, ``ẏ = Ẇ[i]`` (indices carry no tangent)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from taft.engine.dual import Dual
from taft.engine.registry import register_rule
from taft.errors import UnsupportedError


@register_rule(nn.Embedding)
def embedding_rule(ctx, module: nn.Embedding, name: str, idx) -> Dual:
    idx = idx.primal if isinstance(idx, Dual) else idx
    w = ctx.param(f"{name}.weight")
    # max_norm renormalizes W in place: not a function of w0, so not supported.
    if module.max_norm is not None:
        raise UnsupportedError("embedding rule: max_norm is not supported")
    y = F.embedding(idx, w.primal, module.padding_idx)
    if w.tangent is None:
        return Dual(y, None)
    with ctx.tangent_mode():
        t = F.embedding(idx, w.tangent, module.padding_idx)
    return Dual(y, t)
