"""Hugging Face activation modules, mapped onto the GELU / QuickGELU closed forms.

``GELUActivation`` is erf GELU; ``GELUTanh``/``PytorchGELUTanh``/``NewGELUActivation`` are the tanh form
(``FastGELUActivation`` is the same function written with a pre-multiplied constant).
"""

from __future__ import annotations

from transformers import activations as hf_act

from taft.engine.dual import Dual
from taft.engine.registry import register_rule
from taft.rules.gelu import gelu_dual
from taft.rules.quick_gelu import quick_gelu_dual

_TANH_FORMS = tuple(
    getattr(hf_act, n)
    for n in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")
    if hasattr(hf_act, n)
)


@register_rule(hf_act.GELUActivation)
def hf_gelu_rule(ctx, module, name: str, x: Dual) -> Dual:
    return gelu_dual(ctx, x, "none")


@register_rule(*_TANH_FORMS)
def hf_gelu_tanh_rule(ctx, module, name: str, x: Dual) -> Dual:
    return gelu_dual(ctx, x, "tanh")


@register_rule(hf_act.QuickGELUActivation)
def hf_quick_gelu_rule(ctx, module, name: str, x: Dual) -> Dual:
    return quick_gelu_dual(ctx, x)
