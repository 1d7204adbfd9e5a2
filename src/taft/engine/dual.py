"""A primal/tangent pair flowing through the tangent forward.

A tangent of ``None`` means *exactly zero*: layers upstream of every linearized parameter carry no tangent
at all, so rules can skip the work instead of multiplying by zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Dual(NamedTuple):
    primal: Tensor
    tangent: Tensor | None = None


def add_tangents(*tangents: Tensor | None) -> Tensor | None:
    """Sum of tangents where ``None`` is zero; ``None`` if all are zero."""
    present = [t for t in tangents if t is not None]
    if not present:
        return None
    out = present[0]
    for t in present[1:]:
        out = out + t
    return out


def dual_add(*xs: Dual) -> Dual:
    """Residual / broadcast add. The tangent always has the primal's (broadcast) shape, also when only a
    broadcast term such as a (1, T, D) position embedding carries one."""
    primal = xs[0].primal
    for x in xs[1:]:
        primal = primal + x.primal
    t = add_tangents(*(x.tangent for x in xs))
    if t is not None and t.shape != primal.shape:
        t = t.expand(primal.shape)
    return Dual(primal, t)


def dual_cat(xs: list[Dual], dim: int) -> Dual:
    """Concatenation (CLS / register tokens before patch tokens); missing tangents are zeros."""
    primal = torch.cat([x.primal for x in xs], dim=dim)
    if all(x.tangent is None for x in xs):
        return Dual(primal, None)
    parts = [x.tangent if x.tangent is not None else torch.zeros_like(x.primal) for x in xs]
    return Dual(primal, torch.cat(parts, dim=dim))


def dual_map(x: Dual, fn) -> Dual:
    """Apply a linear, parameter-free map (view, transpose, slice, scale) to both parts."""
    return Dual(fn(x.primal), None if x.tangent is None else fn(x.tangent))


def as_dual(x) -> Dual:
    """Wrap a plain tensor (no tangent) as a Dual; Duals pass through."""
    return x if isinstance(x, Dual) else Dual(x, None)


def is_batched(t: Tensor) -> bool:
    """Whether ``t`` is vmapped (``torch.func.vmap`` over stacked Δw or examples): in-place and data-dependent
    shortcuts are skipped for such tensors (functorch has no batching rule for some, and values cannot steer Python)."""
    return torch._C._functorch.is_batchedtensor(t)
