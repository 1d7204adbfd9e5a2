"""State of one tangent forward: the parameters (w0, Δw), the backward mode, and rule dispatch."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from taft.engine.dual import Dual
from taft.engine.fallback import jvp_fallback
from taft.engine.registry import find_rule, primary_output


class _StraightThrough(torch.autograd.Function):
    """``w0 + (Δw − sg(Δw))`` without computing it: the value is w0 itself (no copy, nothing new to save for
    backward) and the derivative with respect to Δw is the identity (reverse and forward mode). Written in the
    ``setup_context`` form so that ``torch.func.grad`` / ``vmap`` (per-example gradients) can transform it."""

    @staticmethod
    def forward(w0: Tensor, delta: Tensor) -> Tensor:
        return w0.view_as(w0)

    @staticmethod
    def vmap(info, in_dims, w0: Tensor, delta: Tensor):
        """Under vmap over stacked Δw (shard models trained together) the value must be batched like Δw, so that
        each model's gradient reaches its own Δw; an unbatched w0 would sum them. w0 is expanded, not copied."""
        w0_dim, delta_dim = in_dims
        if delta_dim is None:
            return _StraightThrough.apply(w0, delta), w0_dim
        delta = delta.movedim(delta_dim, 0)
        w0 = w0.expand(info.batch_size, *w0.shape) if w0_dim is None else w0.movedim(w0_dim, 0)
        return _StraightThrough.apply(w0, delta), 0

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad

    @staticmethod
    def jvp(ctx, w0_t: Tensor | None, delta_t: Tensor | None) -> Tensor:
        if w0_t is None:
            return delta_t
        return w0_t if delta_t is None else w0_t + delta_t


class SharedWeightLinear(torch.autograd.Function):
    """``x w0ᵀ`` whose weight gradient goes to Δw: the straight-through linear for many models trained together
    (``vmap`` over stacked Δw that share one w0). The value and both products of the backward with w0 are one
    GEMM over every model's rows, because w0 is never expanded per model; only Δw's gradient ``gᵀx`` is per model.
    ``generate_vmap_rule``: functorch batches forward and backward with the ops' own rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, w0: Tensor, delta: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, w0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w0, _ = inputs
        ctx.save_for_backward(x, w0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor]:
        x, w0 = ctx.saved_tensors
        grad_x = grad @ w0 if ctx.needs_input_grad[0] else None
        return grad_x, None, grad.flatten(0, -2).t() @ x.flatten(0, -2)


class TangentContext:
    """Carries w0 and Δw through one forward and dispatches modules to their rules.

    ``params`` maps every parameter name the forward may touch to its value at w0; ``deltas`` maps the
    linearized names to Δw. Two backward modes:

    * ``vjp=True`` (training default): the tangent is computed under ``no_grad`` and the primal uses
      ``w0 + (Δw − sg(Δw))`` — equal to w0 in value, so the output is still f(w0) + J·Δw, but autograd sees
      the plain network at w0 and the gradient wrt Δw is its vector-Jacobian product Jᵀg. Memory is that of
      ordinary fine-tuning; nothing of the tangent pass is kept for backward.
    * ``vjp=False``: autograd differentiates through the tangent pass itself (the reference).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        deltas: Mapping[str, Tensor],
        *,
        vjp: bool = True,
        force_fallback: bool = False,
        replaced: frozenset[str] | None = None,
    ) -> None:
        self.params = params
        self.deltas = deltas
        self.vjp = vjp
        self.force_fallback = force_fallback  # every module through the torch.func.jvp fallback (the reference)
        # Names whose value in ``params`` is not the module's own parameter (w0 copies, re-initialized blocks,
        # w0 + Δw). A module with none of them and no gradient to record runs as itself, exactly the plain
        # model's forward (no parameter swapping). ``None``: unknown, always swap.
        self.replaced = replaced
        self._replaced_prefixes = frozenset() if replaced is None else _prefixes(replaced)
        self._delta_prefixes: frozenset[str] | None = None  # built on first use (deltas is read lazily)
        self.fallback_modules: list[str] = []
        self._straight_through = vjp and torch.is_grad_enabled()
        self._cache: dict[str, Dual] = {}
        self._parts: dict[int, tuple[Tensor, Tensor]] = {}  # id(straight-through weight) -> (w0, Δw)

    # -- parameters -----------------------------------------------------------------------------------
    def param(self, name: str) -> Dual:
        """(primal, tangent) of parameter ``name``; tangent ``None`` when it is not linearized."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        try:
            w0 = self.params[name]
        except KeyError:
            raise KeyError(f"TangentContext.param: no parameter named {name!r}") from None
        delta = self.deltas.get(name)
        if delta is None:
            out = Dual(w0, None)
        elif self._straight_through:
            out = Dual(_StraightThrough.apply(w0, delta), delta.detach())
            self._parts[id(out.primal)] = (w0, delta)
        elif self.vjp:
            out = Dual(w0, delta.detach())
        else:
            out = Dual(w0, delta)
        self._cache[name] = out
        return out

    def straight_through_parts(self, weight: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(w0, Δw)`` behind a weight that :meth:`param` returned in straight-through form, else ``None``."""
        return self._parts.get(id(weight))

    def names_under(self, prefix: str) -> list[str]:
        if not prefix:
            return list(self.params)
        p = prefix + "."
        return [k for k in self.params if k.startswith(p)]

    def linearized_under(self, prefix: str) -> bool:
        if self._delta_prefixes is None:
            self._delta_prefixes = _prefixes(self.deltas)
        return prefix in self._delta_prefixes

    def tangent_mode(self) -> contextlib.AbstractContextManager:
        """Wrap tangent arithmetic: in vjp mode it must not enter the autograd graph."""
        return torch.no_grad() if self.vjp else contextlib.nullcontext()

    # -- dispatch -------------------------------------------------------------------------------------
    def call(self, module: nn.Module, name: str, *args, **kwargs) -> Dual:
        """Run ``module`` (qualified name ``name``) on Dual inputs and return a Dual.

        Modules with no tangent coming in and no linearized parameter inside run as the plain model."""
        entry = find_rule(module)  # None for a forward replaced on the instance, hooks, a changed subclass
        has_tangent = any(isinstance(a, Dual) and a.tangent is not None for a in (*args, *kwargs.values()))
        if not has_tangent and not self.linearized_under(name):
            return Dual(self._plain(module, name, entry, args, kwargs), None)
        if entry is None or self.force_fallback:
            self.fallback_modules.append(name or "<root>")
            strip = len(name) + 1 if name else 0
            params = {full[strip:]: self.param(full) for full in self.names_under(name)}
            return jvp_fallback(params, self.vjp, module, entry, args, kwargs)
        return entry.fn(self, module, name, *args, **kwargs)

    def _plain(self, module, name, entry, args, kwargs, grad: bool = False) -> Tensor:
        prim_args = [a.primal if isinstance(a, Dual) else a for a in args]
        prim_kwargs = {k: (v.primal if isinstance(v, Dual) else v) for k, v in kwargs.items()}
        if not grad and self.replaced is not None and name not in self._replaced_prefixes:
            with torch.no_grad():
                return primary_output(module(*prim_args, **prim_kwargs), entry)
        local = {k[len(name) + 1 :] if name else k: self.params[k] for k in self.names_under(name)}
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = torch.func.functional_call(module, local, tuple(prim_args), prim_kwargs, strict=False)
        return primary_output(out, entry)

class NonLinearContext(TangentContext):
    """Ordinary (non-linear) fine-tuning through the same stages as the tangent forward: ``params`` already hold
    w0 + Δw for the ``trainable`` names, every module runs its own forward with autograd on where a gradient is
    needed, and no tangent is computed (no rule runs)."""

    def __init__(self, params: Mapping[str, Tensor], trainable: frozenset[str], *,
                 replaced: frozenset[str] | None = None) -> None:
        super().__init__(params, {}, replaced=replaced)
        self.trainable = trainable
        self._trainable_prefixes = _prefixes(trainable)

    def call(self, module: nn.Module, name: str, *args, **kwargs) -> Dual:
        entry = find_rule(module)
        grad = name in self._trainable_prefixes or any(
            isinstance(a, Dual) and a.primal.requires_grad for a in (*args, *kwargs.values()))
        return Dual(self._plain(module, name, entry, args, kwargs, grad=grad), None)


def _prefixes(names) -> frozenset[str]:
    """Every module path that holds one of ``names`` ("" included when there is any), so that "is any name under
    this module" is a set lookup."""
    out = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(len(parts)))
    return frozenset(out)
