"""Softmax attention core, shared by every attention form (timm, HF BERT/ViT/CLIP, nn.MultiheadAttention).

``S = s·QKᵀ + M``, ``P = softmax(S)``, ``O = PV``;
``Ṡ = s·(Q̇Kᵀ + QK̇ᵀ)``, ``Ṗ = P⊙(Ṡ − rowsum(P⊙Ṡ))``, ``Ȯ = ṖV + PV̇ = (P⊙Ṡ)V − rowsum(P⊙Ṡ)⊙O + PV̇``.

Nothing cubic in sequence length is built: the largest tensors are (B, h, T, S). The mask M is additive
(0 where attended, a large negative number where not) and carries no tangent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taft.engine.dual import Dual, add_tangents, dual_map


def attention_dual(ctx, q: Dual, k: Dual, v: Dual, *, scale: float, mask: Tensor | None = None) -> Dual:
    """q: (B, h, T, d), k/v: (B, h, S, d), mask broadcastable to (B, h, T, S). Returns O: (B, h, T, d)."""
    s = torch.matmul(q.primal, k.primal.transpose(-2, -1)) * scale  # (B, h, T, S)
    if mask is not None:
        s = s + mask
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p, v.primal)  # (B, h, T, d)
    with ctx.tangent_mode():
        ds = add_tangents(
            None if q.tangent is None else torch.matmul(q.tangent, k.primal.transpose(-2, -1)),
            None if k.tangent is None else torch.matmul(q.primal, k.tangent.transpose(-2, -1)),
        )
        t_p = None
        if ds is not None:
            pds = p * (ds * scale)  # (B, h, T, S)
            t_p = torch.matmul(pds, v.primal) - pds.sum(-1, keepdim=True) * o
        t_v = None if v.tangent is None else torch.matmul(p, v.tangent)
        t = add_tangents(t_p, t_v)
    return Dual(o, t)


def additive_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, S) 1/0 padding mask -> (B, 1, 1, S) additive mask in ``dtype`` (finfo.min where padded)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask.to(dtype) if attention_mask.dtype != torch.bool else _bool_to_add(attention_mask, dtype)
    keep = attention_mask[:, None, None, :].to(torch.bool)
    return _bool_to_add(keep, dtype)


def _bool_to_add(keep: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def separate_qkv_attention(ctx, m, name: str, h: Dual, projections: tuple[str, ...], *, head_dim: int,
                           scale: float, mask: Tensor | None) -> Dual:
    """Attention with separate q, k, v (and optionally output) ``nn.Linear`` projections of module ``m``
    (HF BERT, HF ViT, HF CLIP vision).

    ``Q, K, V = q/k/v(h)`` (Linear rule) split into heads of ``head_dim``, ``O = softmax(s·QKᵀ + M)V``
    (:func:`attention_dual`, ``s = scale``), ``y = o(O)`` (Linear rule) when a fourth projection is named, else
    the merged heads. ``mask`` is additive, or boolean SDPA-style (True = attend)."""
    B, T, _ = h.primal.shape

    def heads(x: Tensor) -> Tensor:
        return x.view(B, T, -1, head_dim).transpose(1, 2)  # (B, nh, T, hd)

    q, k, v = (dual_map(ctx.call(getattr(m, p), f"{name}.{p}", h), heads) for p in projections[:3])
    if mask is not None and mask.dtype == torch.bool:
        mask = _bool_to_add(mask, h.primal.dtype)
    o = attention_dual(ctx, q, k, v, scale=scale, mask=mask)
    o = dual_map(o, lambda x: x.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)
    if len(projections) == 4:
        o = ctx.call(getattr(m, projections[3]), f"{name}.{projections[3]}", o)
    return o
