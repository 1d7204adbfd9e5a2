"""Per-example gradients of a loss with respect to Δw, vectorized with ``torch.func``.

Parameter hooks (Opacus's ``GradSampleModule``) never see Δw, which enters the forward through the tangent
rules, so both modes go through pure functions of Δw instead:

* **non-linear** (``tm.linear=False``, ordinary fine-tuning of the same parameters):
  ``g_i = ∇_Δ ℓ(f(x_i; w0 + Δ), y_i)`` by ``vmap(grad(...))`` over ``functional_call``;
* **tangent** (``tm.linear=True``): ``g_i = J_iᵀ ∇_z ℓ(z_i, y_i)`` with ``z_i = f(x_i; w0) + J_i·Δ``. The batched
  tangent forward gives z (no grad), the cotangents ``c_i = ∇_z ℓ(z_i, y_i)`` are cheap, and ``J_iᵀ c_i`` is the
  plain network's per-example vector-Jacobian product at w0: ``∇_Δ ⟨c_i, f(x_i; w0 + Δ)⟩`` at Δ = 0, the same
  vectorized call as the non-linear mode (one tangent forward + one per-example VJP, about the cost of a private
  non-linear step; vmapping through the tangent rules instead is several times slower on CPU).

Cost: ``chunk`` examples at a time hold ``chunk × d`` gradient entries (d = trainable parameters).

>>> grads = per_example_grads(tm, state, labels, loss_fn)   # {name: (B, *shape)}   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from taft.engine.dual import Dual
from taft.engine.family import State
from taft.rules.attention import additive_mask
from taft.tangent_model import TangentModel

Loss = Callable[[Tensor, Tensor], Tensor]  # (logits (B, C), labels (B,)) -> mean loss


class _Suffix(nn.Module):
    """``tm.suffix`` as a module forward over plain tensors, so ``functional_call`` can swap Δw."""

    def __init__(self, tm: TangentModel) -> None:
        super().__init__()
        self.tm = tm

    def forward(self, tensors: dict[str, Tensor], constants: dict[str, object]) -> Tensor:
        aux = {**constants, **tensors}
        h = aux.pop(_H)
        return self.tm.suffix(State(Dual(h, None) if h is not None else None, aux))


_H = "taft.privacy.h"  # the hidden states among the per-row tensors (absent when the suffix starts at the inputs)


def nonlinear_twin(tm: TangentModel) -> TangentModel:
    """The non-linear model with ``tm``'s base, scope and w0 (re-initialized blocks and CLS token included)."""
    if not tm.linear:
        return tm
    twin = TangentModel(tm.base, tm.scope, reinit=tm.reinit, linearize_cls=tm.linearize_cls, seed=tm.seed,
                        linear=False)
    for n, t in tm.w0_dict().items():  # the same w0 tensors (equal by construction; shared, not re-drawn)
        getattr(twin.w0, n.replace(".", ":")).copy_(t)
    return twin.eval()


def _split_state(state: State, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, object]]:
    """A collated prefix state as (per-row tensors, constants), with a 2-D padding mask also given to the
    blocks as the 4-D additive mask: the families test "is anything padded?" on a 2-D mask, data-dependent
    control flow that ``vmap`` refuses; the 4-D form goes straight to attention. Pooling keeps its own mask."""
    tensors = {k: v for k, v in state.aux.items() if isinstance(v, Tensor)}
    constants = {k: v for k, v in state.aux.items() if not isinstance(v, Tensor)}
    mask = tensors.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        tensors["attention_mask"] = additive_mask(mask, dtype)
    if state.h is not None:
        tensors[_H] = state.h.primal
    else:
        constants[_H] = None
    return tensors, constants


def _vmapped_grad(module: _Suffix, params: dict[str, Tensor], state: State, per_row: Callable, targets: Tensor,
                  chunk: int) -> dict[str, Tensor]:
    tensors, constants = _split_state(state, next(iter(params.values())).dtype)

    def one(p, t_i, target_i):
        z = torch.func.functional_call(module, p, ({k: v[None] for k, v in t_i.items()}, constants))
        return per_row(z, target_i[None])

    # the math attention: batching rules for every op, where vmap runs the fused CPU kernel one example at a time
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0), chunk_size=chunk)(params, tensors,
                                                                                            targets)


def per_example_grads(tm: TangentModel, state: State, labels: Tensor, loss: Loss, *, chunk: int = 32,
                      twin: TangentModel | None = None) -> dict[str, Tensor]:
    """``{original parameter name: (B, *shape)}``: the gradient of ``loss`` on each example of ``state`` alone.

    ``twin``: :func:`nonlinear_twin` of a tangent ``tm``, built once by callers that take many steps."""
    names = tm.linearized
    if not tm.linear:
        module = _Suffix(tm)
        params = {f"tm.delta.{n.replace('.', ':')}": d.detach() for n, d in zip(names, tm.delta_dict().values(),
                                                                                 strict=True)}
        grads = _vmapped_grad(module, params, state, loss, labels, chunk)
    else:
        twin = twin if twin is not None else nonlinear_twin(tm)
        with torch.no_grad():
            z = tm.suffix(state)  # (B, C): f(x; w0) + J·Δ, batched
        z.requires_grad_(True)
        with torch.enable_grad():  # the losses are batch means of per-row terms: B·∇(mean) holds each row's ∇ℓ_i
            cot = torch.autograd.grad(loss(z, labels) * len(z), z)[0]  # (B, C)
        module = _Suffix(twin)
        params = {f"tm.delta.{n.replace('.', ':')}": torch.zeros_like(d) for n, d in
                  zip(names, tm.delta_dict().values(), strict=True)}
        grads = _vmapped_grad(module, params, state, lambda zi, ci: (zi * ci).sum(), cot, chunk)
    return {n: grads[f"tm.delta.{n.replace('.', ':')}"] for n in names}
