"""Shared checks: every rule and every model family against ``torch.func.jvp`` (expected = reference)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from taft.engine.family import family_for
from taft.engine.reference import max_rel_err, reference_jvp
from taft.tangent_model import TangentModel

# One tolerance per dtype (relative to the largest reference entry).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def assert_close(actual: Tensor, expected: Tensor, *, what: str, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or expected.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = max_rel_err(actual, expected)
    assert err <= tol, f"{what}: max relative error {err:.3e} > {tol:.0e}"


def randomize_delta(tm, scale: float = 1e-2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in tm.delta_dict().values():
            d.copy_(torch.randn(d.shape, generator=g, dtype=d.dtype) * scale)


def tangent_model(m: nn.Module, scope: str, scale: float = 0.1, **options) -> TangentModel:
    """``TangentModel(m, scope, **options)`` with a random Δ of size ``scale`` (:func:`randomize_delta`)."""
    tm = TangentModel(m, scope, **options)
    randomize_delta(tm, scale)
    return tm


def jitter_params(m: nn.Module, seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Move every parameter off its special init (zero biases, unit norms, tiny cls) by 0.1·N(0, 1), then cast."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return m.to(dtype)


def example_inputs(m: nn.Module, batch: int = 3, seed: int = 0) -> tuple[tuple, dict]:
    """The family's random valid inputs ``(args, kwargs)`` for ``m``."""
    return family_for(m).example_inputs(batch, torch.Generator().manual_seed(seed))


@contextmanager
def mha_fastpath(enabled: bool) -> Iterator[None]:
    """torch's fused nn.MultiheadAttention fast path on or off for the block (restored afterwards)."""
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def check_against_reference(tm, *args, dtype: torch.dtype | None = None, **kwargs) -> None:
    """Primal and tangent of the closed-form pass equal torch.func.jvp over the whole model's forward.

    ``dtype``: whose tolerance to use (default: the reference's dtype; float32 for a float64 model that computes
    parts in float32, such as LayerNormFp32)."""
    f0, t = tm.forward_parts(*args, **kwargs)
    y, ty = reference_jvp(tm, *args, **kwargs)
    assert_close(f0.detach(), y, what="primal", dtype=dtype)
    assert_close(t.detach(), ty, what="tangent", dtype=dtype)
    assert ty.abs().max() > 0, "reference tangent is zero: the check would pass vacuously"


def check_finite_difference(tm, *args, eps: float = 1e-6, **kwargs) -> None:
    """(f(w0 + εΔ) − f(w0 − εΔ)) / 2ε ≈ J·Δ in one random direction (float64; O(ε²) error).

    f is evaluated by the non-linear twin of ``tm`` (same scope and options, ``linear=False``), which runs the
    modules' own forwards: independent of every closed-form rule."""
    _, t = tm.forward_parts(*args, **kwargs)
    delta = {n: d.detach() for n, d in tm.delta_dict().items()}
    twin = TangentModel(tm.base, tm.scope, reinit=tm.reinit, linearize_cls=tm.linearize_cls, seed=tm.seed,
                        linear=False)

    def at(sign: float) -> Tensor:
        twin.load_delta({n: sign * eps * d for n, d in delta.items()})
        with torch.no_grad():
            return twin(*args, **kwargs)

    fd = (at(1.0) - at(-1.0)) / (2 * eps)
    err = max_rel_err(t.detach(), fd)
    assert err < 1e-6, f"finite difference: max relative error {err:.3e}"
