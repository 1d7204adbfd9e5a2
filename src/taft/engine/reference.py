"""The reference tangent: ``torch.func.jvp`` of the *whole* model through ``functional_call`` at w0.

Independent of every closed-form rule (it only uses the model's own forward), so it is what rules are
checked against — in tests and in ``taft check``. The core takes a function of the parameters
(:func:`jvp_of`, :func:`vjp_of`); :func:`model_function` builds that function for a ``TangentModel``'s base model,
and :func:`reference_jvp` / :func:`reference_vjp` are the two combined.

>>> f, w0 = model_function(tm, (x,), {})                          # doctest: +SKIP
>>> y, jvp = jvp_of(f, w0, tm.delta_dict())                       # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from taft.engine.fallback import forward_ad_safe_attention


def model_function(tm, args: tuple, kwargs: dict) -> tuple[Callable[[dict[str, Tensor]], Tensor],
                                                            dict[str, Tensor]]:
    """``(f, w0)``: ``f(w)`` runs ``tm``'s base model on ``args``/``kwargs`` with its linearized parameters set to
    ``w`` (the others at their base values) and returns the family's output; ``w0`` holds their base values."""
    if tm.cls_stage is not None:
        raise ValueError("reference: linearize_cls adds a token the base model does not have; "
                         "use force_fallback=True as the reference instead")
    params = tm.base_params()
    lin = {n: params[n] for n in tm.linearized}
    fixed = {n: p for n, p in params.items() if n not in lin}

    def f(w):
        out = torch.func.functional_call(tm.base, {**fixed, **w}, args, kwargs)
        return tm.family.select_output(out)

    return f, lin


def jvp_of(f: Callable[[dict[str, Tensor]], Tensor], w0: dict[str, Tensor],
           delta: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(f(w0), J_f(w0)·Δw)`` by forward-mode AD (attention on a forward-AD-safe path)."""
    delta = {n: d.detach() for n, d in delta.items()}
    with forward_ad_safe_attention():
        return torch.func.jvp(f, (w0,), (delta,))


def vjp_of(f: Callable[[dict[str, Tensor]], Tensor], w0: dict[str, Tensor], cotangent: Tensor) -> dict[str, Tensor]:
    """``J_f(w0)ᵀ·g`` by reverse-mode AD: the gradient of ⟨g, f_lin⟩ with respect to Δw."""
    _, pullback = torch.func.vjp(f, w0)
    return pullback(cotangent)[0]


def reference_jvp(tm, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """(f(x; w0), J(x; w0)·Δw) for ``tm``'s base model and current Δw (:func:`model_function` + :func:`jvp_of`).

    Not defined for ``linearize_cls`` (the fresh CLS token is not a parameter of the base model)."""
    f, w0 = model_function(tm, args, kwargs)
    return jvp_of(f, w0, tm.delta_dict())


def reference_vjp(tm, cotangent: Tensor, *args, **kwargs) -> dict[str, Tensor]:
    """Jᵀ·g at w0 over ``tm``'s base model's own forward (:func:`model_function` + :func:`vjp_of`)."""
    f, w0 = model_function(tm, args, kwargs)
    return vjp_of(f, w0, cotangent)


def max_rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / max |expected| (0 when both are exactly 0)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
