"""``torch.nn.MultiheadAttention`` (open_clip ViT blocks): packed or separate input projections.

With ``Wq, Wk, Wv`` the row blocks of ``in_proj_weight`` (or ``q/k/v_proj_weight``) and ``bq, bk, bv`` the
chunks of ``in_proj_bias``::

    Q = x_q Wqᵀ + bq,  K = x_k Wkᵀ + bk,  V = x_v Wvᵀ + bv          (then split into h heads of size d)
    O = softmax(QKᵀ/√d + M) V,   y = concat_h(O) W_oᵀ + b_o

The tangents of the projections are the linear rule's (``Q̇ = ẋ_q Wqᵀ + x_q Ẇqᵀ + ḃq``, ...), the attention
core's is :func:`taft.rules.attention.attention_dual` and the output projection is the ``out_proj`` Linear rule.
M is the additive mask torch builds: ``attn_mask`` (2-D ``(L, S)`` or 3-D ``(N·h, L, S)``) plus
``key_padding_mask`` (``(N, S)``); boolean masks mean *True = not attended* and become −inf, float masks are
added as they are. ``bias_k``/``bias_v`` append one learned key/value (with tangent ``ḃ_k``/``ḃ_v``) and
``add_zero_attn`` one zero key/value, each padding the masks with an attended column, as torch does.
``is_causal`` with no ``key_padding_mask`` and ``need_weights=False`` uses the top-left causal mask (what
SDPA does in that case); otherwise ``attn_mask`` is used, as in torch. Attention dropout in training is not
supported (:class:`~taft.errors.UnsupportedError`). The rule returns ``attn_output`` only (the weights are
not a tangent).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from taft.engine.dual import Dual, as_dual, dual_cat, dual_map
from taft.engine.registry import first_output, register_rule
from taft.errors import UnsupportedError
from taft.rules.attention import attention_dual, to_additive
from taft.rules.linear import linear_dual


def _pad_col(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else torch.nn.functional.pad(mask, (0, 1))


@register_rule(nn.MultiheadAttention, plain_output=first_output)
def multihead_attention_rule(
    ctx,
    m: nn.MultiheadAttention,
    name: str,
    query,
    key,
    value,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> Dual:
    """``y = out_proj(softmax(QKᵀ/√d + M)V)`` with ``Q, K, V`` from the packed (or separate) input projection;
    ``ẏ`` = the Linear rule on each projection, :func:`attention_dual` on the core, the Linear rule on
    ``out_proj`` (see the module docstring for the masks, ``bias_k/v`` and ``add_zero_attn``)."""
    if m.training and m.dropout > 0.0:
        raise UnsupportedError("multihead attention rule: attention dropout in training mode is not supported; "
                               "call model.eval() (or set the dropout to 0) before the tangent forward")
    self_attn = query is key and key is value
    query, key, value = as_dual(query), as_dual(key), as_dual(value)
    batched = query.primal.dim() == 3
    # Internal layout (N, L, E).
    if not batched:
        query, key, value = (dual_map(x, lambda t: t.unsqueeze(0)) for x in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = (dual_map(x, lambda t: t.transpose(0, 1)) for x in (query, key, value))
    N, L, E = query.primal.shape
    h, d = m.num_heads, m.head_dim
    dtype = query.primal.dtype

    if is_causal and attn_mask is None:
        raise RuntimeError("multihead attention rule: is_causal needs attn_mask (as torch requires)")
    causal_sdpa = is_causal and key_padding_mask is None and not need_weights
    kpm = to_additive(key_padding_mask, dtype, true_means="masked")
    am = None if causal_sdpa else to_additive(attn_mask, dtype, true_means="masked")

    # Input projections.
    b = ctx.param(f"{name}.in_proj_bias") if m.in_proj_bias is not None else None
    bq = bk = bv = None
    if b is not None:
        bq, bk, bv = (dual_map(b, lambda t, i=i: t[i * E : (i + 1) * E]) for i in range(3))
    if m._qkv_same_embed_dim:
        w = ctx.param(f"{name}.in_proj_weight")  # (3E, E)
        if self_attn:
            qkv = linear_dual(ctx, query, w, b)  # (N, L, 3E)
            q, k, v = (dual_map(qkv, lambda t, i=i: t[..., i * E : (i + 1) * E]) for i in range(3))
        else:
            wq, wk, wv = (dual_map(w, lambda t, i=i: t[i * E : (i + 1) * E]) for i in range(3))
            q, k, v = linear_dual(ctx, query, wq, bq), linear_dual(ctx, key, wk, bk), linear_dual(ctx, value, wv, bv)
    else:
        q = linear_dual(ctx, query, ctx.param(f"{name}.q_proj_weight"), bq)
        k = linear_dual(ctx, key, ctx.param(f"{name}.k_proj_weight"), bk)
        v = linear_dual(ctx, value, ctx.param(f"{name}.v_proj_weight"), bv)

    if m.bias_k is not None and m.bias_v is not None:
        bias_k = dual_map(ctx.param(f"{name}.bias_k"), lambda t: t.reshape(1, 1, E).expand(N, 1, E))
        bias_v = dual_map(ctx.param(f"{name}.bias_v"), lambda t: t.reshape(1, 1, E).expand(N, 1, E))
        k, v = dual_cat([k, bias_k], 1), dual_cat([v, bias_v], 1)
        am, kpm = _pad_col(am), _pad_col(kpm)

    def heads(t: Tensor) -> Tensor:
        return t.reshape(N, t.shape[1], h, d).transpose(1, 2)  # (N, h, ·, d)

    q, k, v = dual_map(q, heads), dual_map(k, heads), dual_map(v, heads)
    if m.add_zero_attn:
        z = Dual(torch.zeros(N, h, 1, d, dtype=dtype, device=query.primal.device), None)
        k, v = dual_cat([k, z], 2), dual_cat([v, z], 2)
        am, kpm = _pad_col(am), _pad_col(kpm)
    S2 = k.primal.shape[2]

    mask = None
    if causal_sdpa:
        keep = torch.ones(L, S2, dtype=torch.bool, device=query.primal.device).tril(diagonal=0)
        mask = to_additive(keep, dtype)  # (L, S)
    elif am is not None:
        mask = am if am.dim() == 2 else am.reshape(N, h, L, S2)  # (L, S) or (N, h, L, S)
    if kpm is not None:
        kpm = kpm.reshape(N, 1, 1, S2)
        mask = kpm if mask is None else mask + kpm

    o = attention_dual(ctx, q, k, v, scale=math.sqrt(1.0 / d), mask=mask)  # (N, h, L, d)
    o = dual_map(o, lambda t: t.transpose(1, 2).reshape(N, L, E))
    y = ctx.call(m.out_proj, f"{name}.out_proj", o)  # (N, L, E)
    if not batched:
        return dual_map(y, lambda t: t.squeeze(0))
    if not m.batch_first:
        return dual_map(y, lambda t: t.transpose(0, 1))
    return y
