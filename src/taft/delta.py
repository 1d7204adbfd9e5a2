"""Δw algebra: typed functions over ``{parameter name: tensor}`` dicts.

Composition (averaging shard models), unlearning (removing one from the average) and task arithmetic (adding
scaled task vectors) are all linear algebra on Δw; they go through these functions only, so that a mismatch is
refused, never broadcast or silently dropped. Every function leaves its inputs unchanged and returns tensors in
the inputs' key order.

* Two Δw combine only when they have the same names, shapes, dtypes and devices (:func:`check_compatible`);
  :func:`zero_fill` widens a Δw to a larger scope with explicit zeros.
* Reductions (:func:`dot`, :func:`norm`, :func:`cosine`) accumulate in float64 and return Python floats.

>>> avg = weighted_average([d1, d2, d3], [100, 80, 120])   # doctest: +SKIP  (weights: shard sizes)
>>> tv = subtract(finetuned, base); merged = add(base, scale(tv, 0.4))   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from taft.errors import TaftError

Delta = Mapping[str, Tensor]


class DeltaMismatchError(TaftError):
    """Two Δw that cannot be combined (different names, shapes, dtypes or devices), or an invalid coefficient."""


def check_compatible(*deltas: Delta) -> None:
    """Raise :class:`DeltaMismatchError` unless every Δw has the first one's names, shapes, dtypes and devices."""
    if not deltas:
        raise DeltaMismatchError("no Δw given")
    first = deltas[0]
    for i, d in enumerate(deltas[1:], start=1):
        if set(d) != set(first):
            missing, extra = sorted(set(first) - set(d)), sorted(set(d) - set(first))
            raise DeltaMismatchError(
                f"Δw #{i} has different parameter names from Δw #0 (missing {missing[:5]}, extra {extra[:5]}"
                f"{'...' if len(missing) > 5 or len(extra) > 5 else ''}); they come from different scopes — "
                "train with the same --scope, or widen one with taft.delta.zero_fill"
            )
        for n, t in first.items():
            u = d[n]
            if u.shape != t.shape:
                raise DeltaMismatchError(f"{n!r}: shape {tuple(u.shape)} in Δw #{i}, {tuple(t.shape)} in Δw #0; "
                                         "they come from different base models")
            if u.dtype != t.dtype:
                raise DeltaMismatchError(f"{n!r}: dtype {u.dtype} in Δw #{i}, {t.dtype} in Δw #0; convert one "
                                         f"first (e.g. {{k: v.to({t.dtype}) for k, v in delta.items()}})")
            if u.device != t.device:
                raise DeltaMismatchError(f"{n!r}: on {u.device} in Δw #{i}, on {t.device} in Δw #0; move one first")


def _coef(c: float, what: str) -> float:
    c = float(c)
    if not math.isfinite(c):
        raise DeltaMismatchError(f"{what} must be finite, got {c}")
    return c


def linear_combination(deltas: Sequence[Delta], coefficients: Sequence[float]) -> dict[str, Tensor]:
    """``Σ cᵢ·Δᵢ`` (every Δᵢ compatible, one finite coefficient each)."""
    if len(deltas) != len(coefficients):
        raise DeltaMismatchError(f"{len(deltas)} Δw but {len(coefficients)} coefficients")
    check_compatible(*deltas)
    cs = [_coef(c, "a coefficient") for c in coefficients]
    out = {}
    for n in deltas[0]:
        acc = deltas[0][n] * cs[0]
        for d, c in zip(deltas[1:], cs[1:], strict=True):
            acc = acc.add(d[n], alpha=c)
        out[n] = acc
    return out


def add(a: Delta, b: Delta) -> dict[str, Tensor]:
    return linear_combination([a, b], [1.0, 1.0])


def subtract(a: Delta, b: Delta) -> dict[str, Tensor]:
    """``a − b`` (a task vector: fine-tuned minus base)."""
    return linear_combination([a, b], [1.0, -1.0])


def scale(a: Delta, c: float) -> dict[str, Tensor]:
    return linear_combination([a], [c])


def negate(a: Delta) -> dict[str, Tensor]:
    return linear_combination([a], [-1.0])


def weighted_average(deltas: Sequence[Delta], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """``Σ wᵢΔᵢ / Σ wᵢ`` (equal weights by default). Weights must be ≥ 0 with a positive sum — e.g. shard sizes,
    so that the average of shard models trained on disjoint data weighs each example equally."""
    if not deltas:
        raise DeltaMismatchError("weighted_average of no Δw")
    ws = [1.0] * len(deltas) if weights is None else [_coef(w, "a weight") for w in weights]
    if len(ws) != len(deltas):
        raise DeltaMismatchError(f"{len(deltas)} Δw but {len(ws)} weights")
    if any(w < 0 for w in ws) or sum(ws) <= 0:
        raise DeltaMismatchError(f"weights must be ≥ 0 with a positive sum, got {ws}")
    total = sum(ws)
    return linear_combination(deltas, [w / total for w in ws])


def zero_fill(a: Delta, template: Delta) -> dict[str, Tensor]:
    """``a`` widened to ``template``'s names (same order): names ``a`` lacks become zeros of the template's shape,
    dtype and device. Names of ``a`` outside the template, or a shape/dtype/device that differs, are refused."""
    extra = sorted(set(a) - set(template))
    if extra:
        raise DeltaMismatchError(f"Δw has parameters outside the target scope: {extra[:5]}"
                                 f"{'...' if len(extra) > 5 else ''}")
    out = {}
    for n, t in template.items():
        if n in a:
            check_compatible({n: t}, {n: a[n]})
            out[n] = a[n].clone()
        else:
            out[n] = torch.zeros_like(t)
    return out


def dot(a: Delta, b: Delta) -> float:
    """``⟨a, b⟩`` over every tensor, accumulated in float64."""
    check_compatible(a, b)
    return float(sum(torch.sum(a[n].double() * b[n].double()) for n in a)) if a else 0.0


def norm(a: Delta) -> float:
    """Euclidean norm over every tensor (float64)."""
    return math.sqrt(max(dot(a, a), 0.0))


def cosine(a: Delta, b: Delta) -> float:
    """``⟨a, b⟩ / (‖a‖‖b‖)``; a zero Δw has no direction and is refused."""
    na, nb = norm(a), norm(b)
    if na == 0.0 or nb == 0.0:
        raise DeltaMismatchError("cosine of a zero Δw is undefined")
    return max(-1.0, min(1.0, dot(a, b) / (na * nb)))
