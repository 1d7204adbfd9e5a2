"""Generic tangent for modules without a closed-form rule: ``torch.func.jvp`` over ``functional_call``.

PyTorch's fused SDPA kernels and the ``nn.MultiheadAttention`` fast path have no forward-mode derivative, so
the fallback runs attention through the math paths (same values up to rounding, and exact derivatives).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from taft.engine.dual import Dual
from taft.engine.registry import primary_output


@contextlib.contextmanager
def forward_ad_safe_attention() -> Iterator[None]:
    """Attention kernels that have forward-mode derivatives: SDPA's math backend, and no fused
    ``nn.MultiheadAttention`` fast path (``_native_multi_head_attention`` has no forward-AD formula).
    Same maths, exact derivatives."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def jvp_fallback(params: Mapping[str, Dual], vjp: bool, module, entry, args, kwargs) -> Dual:
    """The tangent of ``module(*args, **kwargs)`` by ``torch.func.jvp``. ``params``: every parameter and buffer
    the module reads, by its own (module-local) name, as (value at w0, tangent or ``None``); ``vjp``: the tangent
    is returned detached (the vjp backward differentiates the primal only). Costs about a forward and a JVP of
    the module through the math attention kernels."""
    fixed, lin_p, lin_t = {}, {}, {}
    for local, d in params.items():
        if d.tangent is None:
            fixed[local] = d.primal
        else:
            lin_p[local], lin_t[local] = d.primal, d.tangent

    slots = [(i, a) for i, a in enumerate(args) if isinstance(a, Dual) and a.tangent is not None]
    kslots = [(k, v) for k, v in kwargs.items() if isinstance(v, Dual) and v.tangent is not None]
    base_args = [a.primal if isinstance(a, Dual) else a for a in args]
    base_kwargs = {k: (v.primal if isinstance(v, Dual) else v) for k, v in kwargs.items()}

    def f(lin_params, *xs):
        a, kw = list(base_args), dict(base_kwargs)
        for (i, _), x in zip(slots, xs[: len(slots)], strict=True):
            a[i] = x
        for (k, _), x in zip(kslots, xs[len(slots) :], strict=True):
            kw[k] = x
        out = torch.func.functional_call(module, {**fixed, **lin_params}, tuple(a), kw, strict=False)
        return primary_output(out, entry)

    primals = (lin_p, *(d.primal for _, d in slots), *(d.primal for _, d in kslots))
    tangents = (lin_t, *(d.tangent for _, d in slots), *(d.tangent for _, d in kslots))
    with forward_ad_safe_attention():
        y, ty = torch.func.jvp(f, primals, tangents)
    if vjp:
        ty = ty.detach()
    return Dual(y, ty)
