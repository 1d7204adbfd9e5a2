"""Conv2d (patch embedding): ``y = conv(x, W) + b``, ``ẏ = conv(ẋ, W) + conv(x, Ẇ) + ḃ``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from taft.engine.dual import Dual, add_tangents
from taft.engine.registry import register_rule
from taft.errors import UnsupportedError


@register_rule(nn.Conv2d)
def conv2d_rule(ctx, module: nn.Conv2d, name: str, x: Dual) -> Dual:
    if module.padding_mode != "zeros":
        raise UnsupportedError("conv2d rule: only padding_mode='zeros'")
    w = ctx.param(f"{name}.weight")
    b = ctx.param(f"{name}.bias") if module.bias is not None else None
    kw = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    y = F.conv2d(x.primal, w.primal, None if b is None else b.primal, **kw)  # (B, C, H', W')
    with ctx.tangent_mode():
        bt = None if b is None else b.tangent
        t_x = None if x.tangent is None else F.conv2d(x.tangent, w.primal, None, **kw)
        if w.tangent is not None:
            t_w = F.conv2d(x.primal, w.tangent, bt, **kw)
        elif bt is not None:
            t_w = bt[:, None, None].expand(y.shape)
        else:
            t_w = None
        t = add_tangents(t_x, t_w)
    return Dual(y, t)
