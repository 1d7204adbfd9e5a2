"""The functional core: a tangent model as pure functions of Δw, for ``torch.func`` (``vmap``, ``grad``, ``jvp``).

``tangent_function(tm)`` is ``(Δw, state) -> (f(x; w0), J(x; w0)·Δw)`` and ``nonlinear_function(tm)`` is
``(Δw, state) -> f(x; w0 + Δw)``, with Δw a ``{parameter name: tensor}`` dict (the names of ``tm.linearized``) and
``state`` a prefix state (``tm.prefix(...)`` or a :class:`~taft.train.cache.FeatureCache` batch). Neither function
reads or writes ``tm``'s own Δw, so ``vmap`` over stacked Δw evaluates many models at once (shards, task vectors)
and ``vmap(grad(...))`` over examples gives per-example gradients (DP-SGD). :class:`~taft.tangent_model.TangentModel`
is the module around them: its only parameters are Δw.

>>> f = tangent_function(tm)                                              # doctest: +SKIP
>>> f0, jvp = f(delta, tm.prefix(input_ids, attention_mask=mask))         # doctest: +SKIP
>>> outs = torch.func.vmap(lambda d: sum(f(d, state)))(stacked_deltas)     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn
from torch.func import functional_call

from taft.engine.family import State
from taft.tangent_model import TangentModel, _key


class _SuffixParts(nn.Module):
    """``tm.suffix_parts`` as a module's forward, so that ``functional_call`` can substitute Δw."""

    def __init__(self, tm: TangentModel) -> None:
        super().__init__()
        self.tm = tm

    def forward(self, state: State) -> tuple[Tensor, Tensor]:
        return self.tm.suffix_parts(state)


def _substitute(tm: TangentModel, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
    names = set(tm.linearized)
    if set(delta) != names:
        missing, extra = sorted(names - set(delta)), sorted(set(delta) - names)
        raise KeyError(f"Δw must hold exactly the model's linearized tensors: missing {missing[:3]}, "
                       f"unexpected {extra[:3]}")
    return {f"tm.delta.{_key(n)}": t for n, t in delta.items()}


def tangent_function(tm: TangentModel) -> Callable[[Mapping[str, Tensor], State], tuple[Tensor, Tensor]]:
    """``(Δw, state) -> (f(x; w0), J(x; w0)·Δw)`` for a tangent model (``linear=True``)."""
    if not tm.linear:
        raise ValueError("tangent_function: this TangentModel is non-linear (linear=False); use nonlinear_function")
    parts = _SuffixParts(tm)

    def f(delta: Mapping[str, Tensor], state: State) -> tuple[Tensor, Tensor]:
        return functional_call(parts, _substitute(tm, delta), (state,))

    return f


def nonlinear_function(tm: TangentModel) -> Callable[[Mapping[str, Tensor], State], Tensor]:
    """``(Δw, state) -> f(x; w0 + Δw)`` for ordinary fine-tuning through the same stages (``linear=False``)."""
    if tm.linear:
        raise ValueError("nonlinear_function: this TangentModel is a tangent model (linear=True); use "
                         "tangent_function")
    parts = _SuffixParts(tm)

    def f(delta: Mapping[str, Tensor], state: State) -> Tensor:
        return functional_call(parts, _substitute(tm, delta), (state,))[0]

    return f
