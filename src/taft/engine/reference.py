"""The reference tangent: ``torch.func.jvp`` of the *whole* model through ``functional_call`` at w0.

Independent of every closed-form rule (it only uses the model's own forward), so it is what rules are
checked against — in tests and in ``taft check``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taft.engine.fallback import forward_ad_safe_attention


def _model_fn(tm, args, kwargs):
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


def reference_jvp(tm, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """(f(x; w0), J(x; w0)·Δw) by forward-mode AD over the base model's own forward.

    Not defined for ``linearize_cls`` (the fresh CLS token is not a parameter of the base model)."""
    f, lin = _model_fn(tm, args, kwargs)
    delta = {n: d.detach() for n, d in tm.delta_dict().items()}
    with forward_ad_safe_attention():
        return torch.func.jvp(f, (lin,), (delta,))


def reference_vjp(tm, cotangent: Tensor, *args, **kwargs) -> dict[str, Tensor]:
    """Jᵀ·g at w0 by reverse-mode AD over the base model's own forward: the gradient of ⟨g, f_lin⟩ wrt Δw."""
    f, lin = _model_fn(tm, args, kwargs)
    _, pullback = torch.func.vjp(f, lin)
    return pullback(cotangent)[0]


def max_rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / max |expected| (0 when both are exactly 0)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
