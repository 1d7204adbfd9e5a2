"""Driver shared by the rule tests: one module through its closed-form rule vs ``torch.func.jvp``.

Parameters are named ``f"{name}.{local}"`` as inside a wrapped model. The reference differentiates the module's
own forward (``functional_call``) with zeros for the parameters that are not linearized, so it knows nothing
of the rules.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from hypothesis import settings
from torch import Tensor, nn

import taft.rules  # noqa: F401  (importing the package registers every rule)
from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.engine.reference import max_rel_err
from tests.helpers import assert_close

RULE_SETTINGS = settings(max_examples=25, deadline=None, database=None)
LAYOUTS = ("contiguous", "transposed", "strided")
FD_EPS = 1e-6
FD_TOL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(shape, g: torch.Generator, dtype=torch.float64, layout: str = "contiguous", scale: float = 1.0):
    """Standard normal × ``scale`` in the requested memory layout (a view of a bigger/permuted buffer)."""
    shape = tuple(shape)
    if layout == "contiguous" or len(shape) == 0:
        return torch.randn(shape, generator=g, dtype=dtype) * scale
    if layout == "transposed":
        if len(shape) < 2:
            layout = "strided"
        else:
            base = torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=g, dtype=dtype) * scale
            return base.transpose(-1, -2)
    if layout == "strided":
        base = torch.randn((*shape[:-1], 2 * shape[-1]), generator=g, dtype=dtype) * scale
        return base[..., ::2]
    raise ValueError(layout)


def module_params(module: nn.Module, name: str) -> dict[str, Tensor]:
    return {f"{name}.{k}": p.detach() for k, p in module.named_parameters()}


def make_deltas(params: dict[str, Tensor], which: Iterable[str], g: torch.Generator, scale: float = 1.0):
    """Δw for the parameters whose *local* name (after the module prefix) is in ``which``."""
    which = set(which)
    out = {}
    for full, p in params.items():
        if full.rsplit(".", 1)[1] in which:
            out[full] = torch.randn(p.shape, generator=g, dtype=p.dtype) * scale
    assert len(out) == len(which), f"unknown parameter in {sorted(which)}"
    return out


def run_rule(module: nn.Module, name: str, params, deltas, *args) -> Dual:
    """``ctx.call`` in reference mode; asserts the closed-form rule ran (not the jvp fallback)."""
    ctx = TangentContext(params, deltas, vjp=False)
    out = ctx.call(module, name, *args)
    assert ctx.fallback_modules == [], f"{type(module).__name__} went to the fallback"
    assert isinstance(out, Dual)
    return out


def _local(name: str, d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(name) + 1 :]: v for k, v in d.items()}


def reference(module: nn.Module, name: str, params, deltas, x, xdot=None, *, differentiable_input=True):
    """(y, ẏ) = torch.func.jvp of the module's own forward at (w0, x) in direction (Δw, ẋ)."""
    w = _local(name, params)
    dw = {k: _local(name, deltas).get(k, torch.zeros_like(v)) for k, v in w.items()}
    if not differentiable_input:

        def f_w(wp):
            return torch.func.functional_call(module, wp, (x,))

        return torch.func.jvp(f_w, (w,), (dw,))

    def f(wp, xp):
        return torch.func.functional_call(module, wp, (xp,))

    return torch.func.jvp(f, (w, x), (dw, torch.zeros_like(x) if xdot is None else xdot))


def upcast(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() for k, v in d.items()}


def check_rule(module, name, params, deltas, x, xdot=None, *, differentiable_input=True) -> tuple[Dual, Tensor]:
    """Rule vs reference. Float32 inputs are checked against the float64 reference of the same values
    (so the float32 rule must be accurate, not merely agree with another float32 computation)."""
    arg = Dual(x, xdot) if differentiable_input else x
    out = run_rule(module, name, params, deltas, arg)
    dtype = x.dtype if differentiable_input else next(iter(params.values())).dtype
    if dtype == torch.float64:
        y, ty = reference(module, name, params, deltas, x, xdot, differentiable_input=differentiable_input)
    else:
        x64 = x.double() if differentiable_input else x
        y, ty = reference(module, name, upcast(params), upcast(deltas), x64,
                          None if xdot is None else xdot.double(), differentiable_input=differentiable_input)
    assert out.primal.dtype == dtype
    assert_close(out.primal.double(), y, what="primal", dtype=dtype)
    assert out.tangent is not None, "a tangent came in but the rule returned None"
    assert out.tangent.dtype == dtype
    assert_close(out.tangent.double(), ty, what="tangent", dtype=dtype)
    return out, ty


def check_no_tangent(module, name, params, x) -> None:
    """Nothing linearized, no input tangent: tangent None and the primal is exactly the module's output."""
    out = TangentContext(params, {}, vjp=False).call(module, name, Dual(x, None))
    assert out.tangent is None
    with torch.no_grad():
        expected = torch.func.functional_call(module, _local(name, params), (x,))
    assert torch.equal(out.primal, expected)


def finite_difference(module, name, params, deltas, x, xdot=None, eps: float = FD_EPS) -> Tensor:
    """Central difference of the module's own forward along (Δw, ẋ) (float64)."""

    def at(sign: float) -> Tensor:
        w = {k: v + sign * eps * deltas[k] if k in deltas else v for k, v in params.items()}
        xx = x if xdot is None else x + sign * eps * xdot
        with torch.no_grad():
            return torch.func.functional_call(module, _local(name, w), (xx,))

    return (at(1.0) - at(-1.0)) / (2 * eps)


def check_finite_difference(tangent: Tensor, fd: Tensor) -> None:
    assert fd.abs().max() > 0, "finite difference is zero: the check would pass vacuously"
    err = max_rel_err(tangent, fd)
    assert err < FD_TOL, f"finite difference: max relative error {err:.3e}"


def direct_rule(module, name, params, *args) -> Dual:
    """Call the registered rule itself (``ctx.call`` short-cuts tangent-free modules to the plain forward)."""
    from taft.engine.registry import find_rule

    entry = find_rule(module)
    assert entry is not None, f"no rule registered for {type(module).__name__}"
    return entry.fn(TangentContext(params, {}, vjp=False), module, name, *args)
