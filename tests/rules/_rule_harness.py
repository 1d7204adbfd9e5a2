"""Driver shared by the rule tests: one module through its closed-form rule vs ``torch.func.jvp``.

Parameters are named ``f"{name}.{local}"`` as inside a wrapped model. The reference differentiates the module's
own forward (``functional_call``) with zeros for the parameters that are not linearized, so it knows nothing
of the rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from hypothesis import settings
from hypothesis import strategies as st
from torch import Tensor, nn

import taft.rules  # noqa: F401  (importing the package registers every rule)
from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.engine.registry import find_rule
from tests.helpers import TOL, assert_close

# TAFT_RULE_EXAMPLES raises the example count for a soak run (e.g. 1000) without editing the tests.
RULE_SETTINGS = settings(max_examples=int(os.environ.get("TAFT_RULE_EXAMPLES", "25")), deadline=None, database=None)
LAYOUTS = ("contiguous", "transposed", "strided")
FD_EPS = 1e-6
FD_TOL = 1e-6
DTYPES = (torch.float64, torch.float32)
SEEDS = st.integers(0, 2**31 - 1)
# Elementwise maps: (B, T, D) inputs; input scales reaching the linear, curved and saturated parts.
SHAPES = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 8))
SCALES = st.sampled_from([0.1, 1.0, 4.0])


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


def input_and_tangent(shape, seed: int, dtype=torch.float64, layout: str = "contiguous", scale: float = 1.0):
    """(x, ẋ) for a parameter-free map: ``x`` is N(0, 1) × ``scale``, ``ẋ`` is N(0, 1), both in ``layout``."""
    g = gen(seed)
    return rand(shape, g, dtype, layout, scale), rand(shape, g, dtype, layout)


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


# (vjp, grad enabled): the reference mode (autograd through the tangent), and the VJP training mode with and
# without grad, whose rules take the fused paths (SDPA primal, LayerNorm/GELU backward kernels, addmm_ under no_grad)
MODES = ((False, True), (True, True), (True, False))


def run_rule(module: nn.Module, name: str, params, deltas, *args, vjp: bool = False, grad: bool = True) -> Dual:
    """``ctx.call`` (in reference mode unless ``vjp``); asserts the closed-form rule ran (not the jvp fallback)."""
    ctx = TangentContext(params, deltas, vjp=vjp)
    with torch.set_grad_enabled(grad):
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


def assert_close_scaled(actual: Tensor, expected: Tensor, *, what: str, dtype: torch.dtype, floor: float) -> None:
    """Like ``assert_close`` but the error is measured against ``max(max|expected|, floor)``.

    For elementwise activations the natural yardstick is the input's scale: ``g(x)`` and ``g'(x)ẋ`` are
    computed with an absolute error of a few ulps of ``|x|`` / ``|ẋ|`` (GELU's Φ is ``½(1 + erf)``). When every
    drawn element sits deep in the left tail the output is ~1e-6 of the input and a plain relative check
    would only measure that cancellation (in PyTorch's own ``F.gelu`` as much as in the rule)."""
    tol = TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(expected.abs().max().item(), floor)
    diff = (actual - expected).abs().max().item()
    err = 0.0 if diff == 0.0 else (float("inf") if scale == 0.0 else diff / scale)
    assert err <= tol, f"{what}: max error {err:.3e} (relative to {scale:.3e}) > {tol:.0e}"


def check_rule(module, name, params, deltas, x, xdot=None, *, differentiable_input=True,
               elementwise: bool = False) -> tuple[Dual, Tensor]:
    """Rule vs reference. Float32 inputs are checked against the float64 reference of the same values
    (so the float32 rule must be accurate, not merely agree with another float32 computation).

    ``elementwise``: parameter-free pointwise map; errors are measured on the scale of the input as well as
    the output (see :func:`assert_close_scaled`)."""
    arg = Dual(x, xdot) if differentiable_input else x
    outs = [run_rule(module, name, params, deltas, arg, vjp=vjp, grad=grad) for vjp, grad in MODES]
    dtype = x.dtype if differentiable_input else next(iter(params.values())).dtype
    if dtype == torch.float64:
        y, ty = reference(module, name, params, deltas, x, xdot, differentiable_input=differentiable_input)
    else:
        x64 = x.double() if differentiable_input else x
        y, ty = reference(module, name, upcast(params), upcast(deltas), x64,
                          None if xdot is None else xdot.double(), differentiable_input=differentiable_input)
    for out, mode in zip(outs, MODES, strict=True):
        assert out.primal.dtype == dtype
        assert out.tangent is not None, f"a tangent came in but the rule returned None (vjp, grad = {mode})"
        assert out.tangent.dtype == dtype
        p, t = out.primal.detach().double(), out.tangent.detach().double()
        if elementwise:
            assert_close_scaled(p, y, what=f"primal {mode}", dtype=dtype, floor=x.abs().max().item())
            assert_close_scaled(t, ty, what=f"tangent {mode}", dtype=dtype, floor=xdot.abs().max().item())
        else:
            assert_close(p, y, what=f"primal (vjp, grad = {mode})", dtype=dtype)
            assert_close(t, ty, what=f"tangent (vjp, grad = {mode})", dtype=dtype)
    return outs[0], ty


def check_non_contiguous(module, name, shape, seed: int, which: Iterable[str] = ("weight", "bias")) -> None:
    """:func:`check_rule` with a transposed ``x`` and a strided ``ẋ`` (neither contiguous), Δw for ``which``."""
    g = gen(seed)
    x, xdot = rand(shape, g, layout="transposed"), rand(shape, g, layout="strided")
    assert not x.is_contiguous() and not xdot.is_contiguous()
    params = module_params(module, name)
    check_rule(module, name, params, make_deltas(params, which, g), x, xdot)


def check_no_tangent(module, name, params, x) -> None:
    """Nothing linearized, no input tangent: tangent None and the primal is exactly the module's output."""
    out = TangentContext(params, {}, vjp=False).call(module, name, Dual(x, None))
    assert out.tangent is None
    with torch.no_grad():
        expected = torch.func.functional_call(module, _local(name, params), (x,))
    assert torch.equal(out.primal, expected)


def check_rule_no_tangent(module, name, params, x, *, exact: bool) -> None:
    """:func:`check_no_tangent`, then the registered rule itself (:func:`direct_rule`) with no tangent anywhere:
    tangent None and the primal equals the module's output (bit for bit when ``exact``, else to tolerance)."""
    check_no_tangent(module, name, params, x)
    out = direct_rule(module, name, params, Dual(x, None))
    assert out.tangent is None
    with torch.no_grad():
        expected = module(x)
    if exact:
        assert torch.equal(out.primal, expected)
    else:
        assert_close(out.primal, expected, what="primal")


def finite_difference(module, name, params, deltas, x, xdot=None, eps: float = FD_EPS) -> Tensor:
    """Central difference of the module's own forward along (Δw, ẋ) (float64)."""

    def at(sign: float) -> Tensor:
        w = {k: v + sign * eps * deltas[k] if k in deltas else v for k, v in params.items()}
        xx = x if xdot is None else x + sign * eps * xdot
        with torch.no_grad():
            return torch.func.functional_call(module, _local(name, w), (xx,))

    return (at(1.0) - at(-1.0)) / (2 * eps)


def check_finite_difference(tangent: Tensor, fd: Tensor, floor: float = 0.0) -> None:
    """``floor``: error yardstick for elementwise maps (``max|ẋ|``), as in :func:`assert_close_scaled`; the
    central difference of a deep-tail GELU value is rounding noise (~1e-16/ε) on a ~1e-9 signal."""
    if floor == 0.0:  # with a floor the bound is absolute (on the input's scale) and stays meaningful at fd = 0
        assert fd.abs().max() > 0, "finite difference is zero: the check would pass vacuously"
    scale = max(fd.abs().max().item(), floor)
    err = (tangent - fd).abs().max().item() / scale
    assert err < FD_TOL, f"finite difference: max error {err:.3e} (relative to {scale:.3e})"


def check_rule_finite_difference(module, name, params, deltas, x, xdot=None, *, elementwise: bool = False) -> None:
    """The rule's tangent along (Δw, ẋ) vs the central difference of the module's own forward (float64).
    Without ``xdot`` the input goes in as is (e.g. embedding indices). ``elementwise``: parameter-free
    pointwise map, error measured on the scale of ``ẋ`` as well (see :func:`check_finite_difference`)."""
    out = run_rule(module, name, params, deltas, x if xdot is None else Dual(x, xdot))
    fd = finite_difference(module, name, params, deltas, x, xdot)
    check_finite_difference(out.tangent, fd, floor=xdot.abs().max().item() if elementwise else 0.0)


def check_full_finite_difference(module, name, x, g: torch.Generator) -> None:
    """:func:`check_rule_finite_difference` along Δw for every parameter of ``module`` and a random ẋ (drawn
    from ``g`` in that order)."""
    params = module_params(module, name)
    deltas = make_deltas(params, [k for k, _ in module.named_parameters()], g)
    check_rule_finite_difference(module, name, params, deltas, x, rand(x.shape, g))


def direct_rule(module, name, params, *args) -> Dual:
    """Call the registered rule itself (``ctx.call`` short-cuts tangent-free modules to the plain forward)."""
    entry = find_rule(module)
    assert entry is not None, f"no rule registered for {type(module).__name__}"
    return entry.fn(TangentContext(params, {}, vjp=False), module, name, *args)
