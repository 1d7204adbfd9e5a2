"""A primal/tangent pair flowing through the tangent forward.

A tangent of ``None`` means *exactly zero*: layers upstream of every linearized parameter carry no tangent
at all, so rules can skip the work instead of multiplying by zeros.
"""

from __future__ import annotations

from typing import NamedTuple

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
    """Residual add: primal and tangent are both linear in the inputs."""
    primal = xs[0].primal
    for x in xs[1:]:
        primal = primal + x.primal
    return Dual(primal, add_tangents(*(x.tangent for x in xs)))


def dual_map(x: Dual, fn) -> Dual:
    """Apply a linear, parameter-free map (view, transpose, slice, scale) to both parts."""
    return Dual(fn(x.primal), None if x.tangent is None else fn(x.tangent))
