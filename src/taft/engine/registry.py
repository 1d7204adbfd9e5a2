"""Closed-form tangent rules registered by module type (one rule per file under ``taft.rules``).

Every rule has the same signature::

    rule(ctx: TangentContext, module: nn.Module, name: str, *args, **kwargs) -> Dual

``name`` is the module's qualified name inside the wrapped model (parameter ``f"{name}.weight"`` is looked up
through ``ctx.param``); tensor arguments arrive as :class:`~taft.engine.dual.Dual`. A rule may call
``ctx.call(child, f"{name}.child", ...)`` for its submodules, so a fused kernel can replace one rule without
touching its callers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

Rule = Callable[..., object]


@dataclass(frozen=True)
class RuleEntry:
    fn: Rule
    # Maps the module's own forward output to the one tensor the rule returns (HF attention returns a tuple).
    plain_output: Callable[[object], object] | None = None
    methods: tuple[str, ...] = ("forward",)  # methods of the module class the rule re-implements
    bypassed: tuple[str, ...] = ()  # submodules whose forward the rule re-implements instead of calling


_RULES: dict[type[nn.Module], RuleEntry] = {}


def register_rule(*module_types: type[nn.Module], plain_output: Callable[[object], object] | None = None,
                  methods: tuple[str, ...] = ("forward",), bypassed: tuple[str, ...] = ()):
    """Decorator registering ``fn`` as the closed-form tangent rule for ``module_types``.

    Lookup takes the exact type first, then the nearest registered base class *only if the subclass keeps the
    base's* ``methods`` (``forward`` and any other method the rule re-implements): a subclass that changes the
    maths must get its own rule (or the fallback). A module with an instance-level forward or forward hooks, or
    whose ``bypassed`` submodules have them, gets no rule either (the rule would skip them)."""

    def deco(fn: Rule) -> Rule:
        for t in module_types:
            _RULES[t] = RuleEntry(fn, plain_output, methods, bypassed)
        return fn

    return deco


def customized(module: nn.Module) -> bool:
    """A forward set on the instance, or forward hooks / pre-hooks: only the module's own call is faithful."""
    return "forward" in module.__dict__ or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


def keeps_methods(cls: type, base: type, methods: tuple[str, ...] = ("forward",)) -> bool:
    """Whether ``cls`` is ``base`` or a subclass that runs ``base``'s own code for every one of ``methods``
    (the class attributes are the same functions)."""
    return cls is base or (issubclass(cls, base) and all(getattr(cls, m, None) is getattr(base, m, None)
                                                          for m in methods))


def find_rule(module: nn.Module) -> RuleEntry | None:
    """The rule that computes exactly what ``module`` computes, or ``None`` (the module needs the fallback)."""
    entry = _RULES.get(type(module))
    if entry is None:
        base = next((b for b in type(module).__mro__[1:] if b in _RULES), None)
        if base is None or not keeps_methods(type(module), base, _RULES[base].methods):
            return None
        entry = _RULES[base]
    if customized(module) or any(customized(module.get_submodule(b)) for b in entry.bypassed):
        return None
    return entry


def primary_output(out, entry=None) -> Tensor:
    """The one tensor a module call stands for (first element of HF tuples / ModelOutputs)."""
    if entry is not None and entry.plain_output is not None:
        return entry.plain_output(out)
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        return next(iter(out.values()))
    if isinstance(out, tuple | list):
        return out[0]
    raise TypeError(f"cannot take a tensor output from {type(out).__name__}")


def first_output(out):
    """``plain_output`` of modules that return ``(output, weights, ...)`` tuples (HF attention, MHA)."""
    return out[0] if isinstance(out, tuple | list) else out
