"""Fused tangent attention: ``O`` and ``Ȯ`` in one flash-style pass that never builds the T×S probabilities.

``S = s·QKᵀ + M``, ``P = softmax(S)``, ``O = PV``;  ``Ṡ = s·(Q̇Kᵀ + QK̇ᵀ)``,
``Ȯ = PV̇ + (P⊙Ṡ)V − rowsum(P⊙Ṡ)⊙O``.

Per block of queries the kernel streams over key blocks with the online softmax: with ``e = exp(S − m)``
it keeps ``l = Σe``, ``A = Σe·V``, ``Σe·Ṡ`` and ``Σ(e·V̇ + e·(Ṡ − c)·V)``, rescaled when the running max ``m``
grows, with ``c`` the running mean ``Σe·Ṡ/l`` (the centred form ``Ṗ = P⊙(Ṡ − rowsum(P⊙Ṡ))``, computed online: when
``c`` moves, the sum is shifted by ``(c_old − c_new)·A``); at the end ``O = A/l`` and
``Ȯ = Σ(...)/l − (Σe·Ṡ/l − c)·O``, whose last term is ≈ 0. Forward only: it is used where the tangent needs
no gradient (inference, and the VJP backward, where the tangent is computed under ``no_grad``).

Inputs are (B, h, T, d) / (B, h, S, d) tensors of any strides; the additive mask broadcasts to (B, h, T, S)
(stride 0 on broadcast dimensions, so a (B, 1, 1, S) padding mask is never expanded in memory). Matrix products
accumulate in float32; float32 inputs use IEEE products (``input_precision="ieee"``, no TF32), so float32 results
match the exact path to ~1e-6 — but those run on CUDA cores: with the kernel, the float32 ViT-B/16 tangent forward
was 2.3× slower than with the unfused cuBLAS path (H200, benchmarks/results/gpu-run1), so the engine calls it for
bfloat16/float16 only (float32 stays checked here and in CI). bfloat16/float16 products round their inputs (``P``
and ``P⊙(Ṡ − c)`` too) to the input dtype, as flash attention does; centring keeps that rounding on Ṡ's deviation
from its mean, not on Ṡ. Any sequence lengths (partial blocks are masked) and
head dims up to 256.

Triton is optional: :func:`available` says whether the kernel can run on a tensor. With ``TRITON_INTERPRET=1``
set before import, the kernel runs on CPU tensors through Triton's interpreter (how CI checks it).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
MAX_NUMEL = 2**31  # element offsets are computed in 32 bits


def available(x: Tensor) -> bool:
    """Whether :func:`tangent_attention` runs on tensors like ``x`` (device, dtype, Triton present)."""
    if triton is None or x.dtype not in DTYPES:
        return False
    return x.is_cuda or (INTERPRET and x.device.type == "cpu")


if triton is not None:

    @triton.jit
    def _tangent_attention_kernel(
        Q, K, V, DQ, DK, DV, BIAS, O, DO,
        s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd,
        s_dqb, s_dqh, s_dqt, s_dqd, s_dkb, s_dkh, s_dks, s_dkd, s_dvb, s_dvh, s_dvs, s_dvd,
        s_mb, s_mh, s_mt, s_ms, s_ob, s_oh, s_ot, s_od, s_pb, s_ph, s_pt, s_pd,
        H, T, S, D, scale,
        HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_BIAS: tl.constexpr,
        WRITE_O: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # one flat grid (CUDA's second grid dimension stops at 65,535, which B·h can pass); consecutive programs
        # are query blocks of the same head, so they share K and V in cache
        n_m = tl.cdiv(T, BLOCK_M)
        pid = tl.program_id(0)
        pid_m = pid % n_m
        pid_bh = pid // n_m
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        cols0 = tl.arange(0, BLOCK_N)
        row_ok = rows < T
        dim_ok = dims < D
        q_ok = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qt + dims[None, :] * s_qd, mask=q_ok, other=0.0)
        if HAS_DQ:
            dq = tl.load(DQ + b * s_dqb + h * s_dqh + rows[:, None] * s_dqt + dims[None, :] * s_dqd,
                         mask=q_ok, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        sum_pds = tl.zeros([BLOCK_M], tl.float32)
        c_i = tl.zeros([BLOCK_M], tl.float32)
        acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, S, BLOCK_N):
            cols = start + cols0
            col_ok = cols < S
            kv_ok = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + b * s_kb + h * s_kh + cols[:, None] * s_ks + dims[None, :] * s_kd, mask=kv_ok, other=0.0)
            v = tl.load(V + b * s_vb + h * s_vh + cols[:, None] * s_vs + dims[None, :] * s_vd, mask=kv_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            s = s * scale
            if HAS_BIAS:
                bias = tl.load(BIAS + b * s_mb + h * s_mh + rows[:, None] * s_mt + cols[None, :] * s_ms,
                               mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                s = s + bias.to(s.dtype)
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far: keep exp() finite
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_new = l_i * alpha + tl.sum(p, 1)
            acc_o = acc_o * alpha[:, None]
            acc_t = acc_t * alpha[:, None]
            if HAS_DQ or HAS_DK:
                ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                if HAS_DQ:
                    ds += tl.dot(dq, tl.trans(k), input_precision="ieee")
                if HAS_DK:
                    dk = tl.load(DK + b * s_dkb + h * s_dkh + cols[:, None] * s_dks + dims[None, :] * s_dkd,
                                 mask=kv_ok, other=0.0)
                    ds += tl.dot(q, tl.trans(dk), input_precision="ieee")
                ds = ds * scale
                # Centred form: accumulate P⊙(Ṡ − c)·V with c the running mean of Ṡ under P (exact for any
                # constant c per row: the rowsum term absorbs it). The rounded products then carry only Ṡ's
                # deviation from its mean, so a row whose Ṡ is constant (Ṗ = 0) gives Ȯ = PV̇ with no
                # cancellation. When c moves, the rows already summed are shifted with A = Σe·V.
                sum_new = sum_pds * alpha + tl.sum(p * ds, 1)
                c_new = tl.where(l_new > 0, sum_new / l_new, 0.0)
                acc_t += (c_i - c_new)[:, None] * acc_o
                pdc = (p * (ds - c_new[:, None])).to(v.dtype)
                acc_t += tl.dot(pdc, v, input_precision="ieee")
                sum_pds = sum_new
                c_i = c_new
            acc_o += tl.dot(p.to(v.dtype), v, input_precision="ieee")
            if HAS_DV:
                dv = tl.load(DV + b * s_dvb + h * s_dvh + cols[:, None] * s_dvs + dims[None, :] * s_dvd,
                             mask=kv_ok, other=0.0)
                acc_t += tl.dot(p.to(dv.dtype), dv, input_precision="ieee")
            l_i = l_new
            m_i = m_new
        o = acc_o / l_i[:, None]
        t = acc_t / l_i[:, None] - (sum_pds / l_i - c_i)[:, None] * o
        if WRITE_O:
            tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_ot + dims[None, :] * s_od,
                     o.to(O.dtype.element_ty), mask=q_ok)
        tl.store(DO + b * s_pb + h * s_ph + rows[:, None] * s_pt + dims[None, :] * s_pd,
                 t.to(DO.dtype.element_ty), mask=q_ok)


def _config(dtype: torch.dtype, block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small tiles in the interpreter (fast, and several blocks per
    sequence so the online rescaling is exercised)."""
    if INTERPRET:
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return (32, 32, 4, 2) if block_d <= 64 else (32, 16, 4, 2)
    return (64, 64, 4, 2) if block_d <= 64 else (64, 32, 4, 2)


def _strides(x: Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if x is None else tuple(x.stride())


def tangent_attention(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
                      *, scale: float, mask: Tensor | None = None, need_primal: bool = True,
                      block: tuple[int, int] | None = None) -> tuple[Tensor | None, Tensor]:
    """``(O, Ȯ)`` of softmax attention (``O`` is ``None`` when ``need_primal`` is False).

    q, dq: (B, h, T, d); k, v, dk, dv: (B, h, S, d); tangents may be ``None`` (zero). ``mask``: additive,
    broadcastable to (B, h, T, S). ``block`` overrides (BLOCK_M, BLOCK_N) (tests)."""
    if triton is None:
        raise RuntimeError("tangent_attention needs Triton")
    B, H, T, D = q.shape
    S = k.shape[2]
    if k.shape != (B, H, S, D) or v.shape != (B, H, S, D):
        raise ValueError(f"tangent_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"tangent_attention: head dim {D} > {MAX_HEAD_DIM}")
    if max(q.numel(), k.numel()) >= MAX_NUMEL:
        raise ValueError(f"tangent_attention: tensors of {MAX_NUMEL} elements or more need 64-bit offsets")
    for name, t, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if t is not None and (t.shape != ref.shape or t.dtype != ref.dtype):
            raise ValueError(f"tangent_attention: {name} must match its primal's shape and dtype")
    if mask is not None:
        mask = mask.expand(B, H, T, S)  # a view: broadcast dimensions get stride 0
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = _config(q.dtype, block_d)
    if block is not None:
        bm, bn = block
    # (B, h, T, d) views of (B, T, h, d) memory: merging the heads afterwards (``transpose(1, 2).reshape``) is free
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2) if need_primal else None
    do = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    dummy = q  # never read: the matching HAS_* flag is off
    grid = (triton.cdiv(T, bm) * B * H,)
    _tangent_attention_kernel[grid](
        q, k, v, dummy if dq is None else dq, dummy if dk is None else dk, dummy if dv is None else dv,
        dummy if mask is None else mask, do if o is None else o, do,
        *q.stride(), *k.stride(), *v.stride(), *_strides(dq), *_strides(dk), *_strides(dv), *_strides(mask),
        *_strides(o), *do.stride(),
        H, T, S, D, float(scale),
        HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None, HAS_BIAS=mask is not None,
        WRITE_O=need_primal,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return o, do
