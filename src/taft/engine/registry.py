"""Closed-form tangent rules registered by module type (one rule per file under ``taft.rules``).

Every rule has the same signature::

    rule(ctx: TangentContext, module: nn.Module, name: str, *args, **kwargs) -> Dual

``name`` is the module's qualified name inside the wrapped model (parameter ``f"{name}.weight"`` is looked up
through ``ctx.param``); tensor arguments arrive as :class:`~taft.engine.dual.Dual`. A rule may call
``ctx.call(child, f"{name}.child", ...)`` for its submodules, so a fused kernel can replace one rule without
touching its callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Rule = Callable[..., object]


@dataclass(frozen=True)
class RuleEntry:
    fn: Rule
    # Maps the module's own forward output to the one tensor the rule returns (HF attention returns a tuple).
    plain_output: Callable[[object], object] | None = None


_RULES: dict[type[nn.Module], RuleEntry] = {}


def register_rule(*module_types: type[nn.Module], plain_output: Callable[[object], object] | None = None):
    """Decorator registering ``fn`` as the closed-form tangent rule for ``module_types``.

    Lookup takes the exact type first, then the nearest registered base class *only if the subclass keeps the
    base's ``forward``*: a subclass that changes the maths must get its own rule (or the fallback)."""

    def deco(fn: Rule) -> Rule:
        for t in module_types:
            _RULES[t] = RuleEntry(fn, plain_output)
        return fn

    return deco


def find_rule(module: nn.Module) -> RuleEntry | None:
    entry = _RULES.get(type(module))
    if entry is not None:
        return entry
    forward = type(module).forward
    for base in type(module).__mro__[1:]:
        if base in _RULES:
            return _RULES[base] if base.forward is forward else None
    return None


def registered_types() -> list[type[nn.Module]]:
    return sorted(_RULES, key=lambda t: f"{t.__module__}.{t.__qualname__}")
