"""Softmax attention core, shared by every attention form (timm, HF BERT/ViT/CLIP, nn.MultiheadAttention).

``S = s·QKᵀ + M``, ``P = softmax(S)``, ``O = PV``;
``Ṡ = s·(Q̇Kᵀ + QK̇ᵀ)``, ``Ṗ = P⊙(Ṡ − rowsum(P⊙Ṡ))``, ``Ȯ = ṖV + PV̇ = (P⊙Ṡ)V − rowsum(P⊙Ṡ)⊙O + PV̇``.

Nothing cubic in sequence length is built: the largest tensors are (B, h, T, S). The mask M is additive
(0 where attended, a large negative number where not) and carries no tangent.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from taft.engine.dual import Dual, add_tangents, dual_map
from taft.kernels import attention as fused

FUSED = os.environ.get("TAFT_FUSED_ATTENTION", "1") != "0"
KERNEL_ON_CPU = False  # tests: run the kernel on CPU tensors through Triton's interpreter


def attention_dual(ctx, q: Dual, k: Dual, v: Dual, *, scale: float, mask: Tensor | None = None) -> Dual:
    """q: (B, h, T, d), k/v: (B, h, S, d), mask broadcastable to (B, h, T, S). Returns O: (B, h, T, d).

    Three exact paths, chosen per call:

    * the fused Triton kernel (:mod:`taft.kernels.attention`) for the tangent when the tensors are on a GPU in
      bfloat16/float16 (:func:`use_kernel`) and the tangent needs no gradient
      (inference, the VJP backward). Under no_grad it also gives the primal; with grad the primal is the model's
      fused ``scaled_dot_product_attention``, so training saves what ordinary fine-tuning saves;
    * elsewhere with grad in VJP mode: the primal through SDPA, the tangent from probabilities recomputed under
      no_grad (nothing of the T×S matrices is kept for backward);
    * otherwise (``backward="tangent"``, which differentiates through the tangent, or no grad on CPU): the
      explicit closed form above, probabilities shared by primal and tangent.
    """
    has_ds = q.tangent is not None or k.tangent is not None
    if not has_ds and v.tangent is None:
        return Dual(_sdpa(q.primal, k.primal, v.primal, mask, scale), None)
    primal_grad = torch.is_grad_enabled() and any(x.primal.requires_grad for x in (q, k, v))
    if ctx.vjp and use_kernel(q.primal, k.primal):
        o = _sdpa(q.primal, k.primal, v.primal, mask, scale) if primal_grad else None
        with torch.no_grad():
            o_k, t = fused.tangent_attention(
                q.primal.detach(), k.primal.detach(), v.primal.detach(), q.tangent, k.tangent, v.tangent,
                scale=scale, mask=None if mask is None else mask.detach(), need_primal=o is None)
        return Dual(o_k if o is None else o, t)
    # Unfused in bfloat16/float16: probabilities and tangent in float32, rounded once at the end (as the fused
    # kernel accumulates in float32); float32/float64 run as they are.
    dtype = q.primal.dtype
    wide = dtype in (torch.bfloat16, torch.float16)
    qw, kw, vw = (_to(x, torch.float32) for x in (q, k, v)) if wide else (q, k, v)
    mw = mask.float() if wide and mask is not None and torch.is_floating_point(mask) else mask
    if ctx.vjp and primal_grad:
        o = _sdpa(q.primal, k.primal, v.primal, mask, scale)  # the model's own primal, saved as usual
        with torch.no_grad():
            p = _probabilities(qw.primal, kw.primal, mw, scale)
            return Dual(o, _narrow(_tangent(p, qw, kw, vw, scale), dtype))
    p = _probabilities(qw.primal, kw.primal, mw, scale)  # (B, h, T, S)
    o = torch.matmul(p, vw.primal)  # (B, h, T, d)
    with ctx.tangent_mode():
        return Dual(o.to(dtype), _narrow(_tangent(p, qw, kw, vw, scale), dtype))


def _to(x: Dual, dtype: torch.dtype) -> Dual:
    return Dual(x.primal.to(dtype), None if x.tangent is None else x.tangent.to(dtype))


def _narrow(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _probabilities(q: Tensor, k: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, h, T, S)
    if mask is not None:
        s = s + mask
    return torch.softmax(s, dim=-1)


def _tangent(p: Tensor, q: Dual, k: Dual, v: Dual, scale: float) -> Tensor | None:
    """``Ȯ = ṖV + PV̇`` with ``Ṗ = P⊙Ṡ − P⊙rowsum(P⊙Ṡ)``, from the probabilities."""
    ds = add_tangents(
        None if q.tangent is None else torch.matmul(q.tangent, k.primal.transpose(-2, -1)),
        None if k.tangent is None else torch.matmul(q.primal, k.tangent.transpose(-2, -1)),
    )
    t_p = None
    if ds is not None:
        pds = p * (ds * scale)  # (B, h, T, S)
        # centred: Ṗ = P⊙Ṡ − P·rowsum(P⊙Ṡ), then ṖV (not (P⊙Ṡ)V − rowsum(P⊙Ṡ)·O, which cancels in low precision)
        t_p = torch.matmul(pds - p * pds.sum(-1, keepdim=True), v.primal)
    t_v = None if v.tangent is None else torch.matmul(p, v.tangent)
    return add_tangents(t_p, t_v)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    if mask is not None and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def use_kernel(x: Tensor, *more: Tensor) -> bool:
    """Whether the fused tangent-attention kernel runs for tensors like ``x``: a GPU tensor in bfloat16/float16
    (IEEE float32 products in Triton are slower than cuBLAS's unfused float32 path; benchmarks/results/gpu-run1),
    unless ``TAFT_FUSED_ATTENTION=0``. CPU tensors only when :data:`KERNEL_ON_CPU` is set under Triton's
    interpreter (tests: float32 through the interpreter)."""
    if not FUSED or not fused.available(x) or x.shape[-1] > fused.MAX_HEAD_DIM:
        return False
    if any(t.numel() >= fused.MAX_NUMEL for t in (x, *more)):  # the kernel's offsets are 32-bit
        return False
    if not x.is_cuda:
        return KERNEL_ON_CPU
    return x.dtype != torch.float32


def to_additive(mask: Tensor | None, dtype: torch.dtype, *, true_means: str = "attend",
                fill: float = float("-inf")) -> Tensor | None:
    """The one attention-mask converter: the additive float mask the attention rules add to the scores.

    ``None`` stays ``None``; a floating mask is already additive and is returned as it is; a bool mask means
    ``true_means`` — ``"attend"`` (SDPA, timm, HF) or ``"masked"`` (``nn.MultiheadAttention``) — and its masked
    positions get ``fill`` (``-inf`` as torch and timm add, ``finfo(dtype).min`` as HF adds)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        masked = ~mask if true_means == "attend" else mask
        # out of place: under vmap (shards trained together) the mask is batched and the zeros are not
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(masked, fill)
    if not torch.is_floating_point(mask):
        raise TypeError(f"attention mask of dtype {mask.dtype}: only bool and floating masks are supported")
    return mask


def additive_mask(attention_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """HF's masks: a (B, S) 1/0 padding mask -> (B, 1, 1, S) additive mask in ``dtype`` (finfo.min where padded);
    a 4-D mask, bool (True = attend) or additive, in ``dtype``."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        attention_mask = attention_mask[:, None, None, :].to(torch.bool)
    elif attention_mask.dtype != torch.bool:
        return attention_mask.to(dtype)
    return to_additive(attention_mask, dtype, fill=torch.finfo(dtype).min)


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
        mask = to_additive(mask, h.primal.dtype, fill=torch.finfo(h.primal.dtype).min)
    o = attention_dual(ctx, q, k, v, scale=scale, mask=mask)
    o = dual_map(o, lambda x: x.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)
    if len(projections) == 4:
        o = ctx.call(getattr(m, projections[3]), f"{name}.{projections[3]}", o)
    return o
