"""Shared checks: every rule and every model family against ``torch.func.jvp`` (expected = reference)."""

from __future__ import annotations

import torch
from torch import Tensor

from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.engine.family import State
from taft.engine.reference import max_rel_err, reference_jvp

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


def check_against_reference(tm, *args, **kwargs) -> None:
    """Primal and tangent of the closed-form pass equal torch.func.jvp over the whole model's forward."""
    f0, t = tm.forward_parts(*args, **kwargs)
    y, ty = reference_jvp(tm, *args, **kwargs)
    assert_close(f0.detach(), y, what="primal")
    assert_close(t.detach(), ty, what="tangent")
    assert ty.abs().max() > 0, "reference tangent is zero: the check would pass vacuously"


def check_finite_difference(tm, *args, eps: float = 1e-6, **kwargs) -> None:
    """(f(w0 + εΔ) − f(w0 − εΔ)) / 2ε ≈ J·Δ in one random direction (float64; O(ε²) error)."""
    _, t = tm.forward_parts(*args, **kwargs)
    base = tm.base_params()
    delta = {n: d.detach() for n, d in tm.delta_dict().items()}

    def at(sign: float) -> Tensor:
        params = dict(base)
        for n, d in delta.items():
            params[n] = base[n] + sign * eps * d
        ctx = TangentContext(params, {}, vjp=False)
        state = tm.family.prepare(*args, **kwargs)
        for i in range(len(tm._stages)):
            if i == tm.cls_stage:
                h = state.h.primal.clone()
                h[:, 0] = params["taft.cls"]
                state = State(Dual(h, None), state.aux)
            state = tm.family.run_stage(ctx, i, state)
        return tm.family.output(state).primal

    fd = (at(1.0) - at(-1.0)) / (2 * eps)
    err = max_rel_err(t.detach(), fd)
    assert err < 1e-6, f"finite difference: max relative error {err:.3e}"
