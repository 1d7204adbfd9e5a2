"""Per-example clipping without per-example gradients ("fast clipping": Opacus's ghost clipping, book-keeping).

For a Linear layer ``y = x Wᵀ + b`` in the trained scope, example i's gradient is ``G_iᵀ A_i`` for the weight and
``Σ_t G_i,t`` for the bias, with ``A_i`` (T, d_in) its input rows and ``G_i`` (T, d_out) the loss gradient at its
output rows. Its squared norm is ``‖G_iᵀA_i‖² = Σ_{t,s} (A_t·A_s)(G_t·G_s)`` (the ghost norm: T² numbers per example
instead of d_in·d_out; the per-example matrix is formed instead when that is smaller), and the clipped sum
``Σ_i f_i G_iᵀ A_i`` is one GEMM over the batch with each example's rows scaled by its factor f_i — no second
backward (book-keeping). The backward itself is asked for the gradients at the recorded layers' outputs only, so
it skips the batch-summed weight gradients an ordinary step forms. LayerNorm:
``Σ_t G ⊙ x̂`` (weight) and ``Σ_t G`` (bias), d numbers per example.

* **Tangent model**: ``∇_Δ ℓ_i = J_iᵀ c_i`` is the plain network's vector-Jacobian product at w0, which is the
  backward the ordinary training step already runs (straight-through ``w0 + Δ − sg(Δ)``,
  :class:`taft.engine.context.TangentContext`); the rules hand the recorder their primal input and output
  (:mod:`taft.engine.record`). A private step is the ordinary forward and backward plus the norms.
* **Non-linear model**: the same identities through module hooks (its layers run their own forward at w0 + Δ).

A trained tensor of any other kind (embeddings, a CLS token, raw attention projections) or one used twice in a
forward has no such form here: the step then takes the per-example-gradient reference
(:func:`taft.privacy.grad_sample.per_example_grads`), which stays the definition the fast path is tested against.

>>> total, norms = clipped_sum(tm, state, labels, loss_fn, clip=1.0)   # {name: tensor}, (B,)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taft.engine.family import State
from taft.engine.record import recording
from taft.privacy.grad_sample import per_example_grads
from taft.privacy.optimizer import clip_and_sum, per_example_norms
from taft.tangent_model import TangentModel

Loss = Callable[[Tensor, Tensor], Tensor]


def _rows(t: Tensor) -> Tensor:
    """(B, T, d) view of a layer's input or output gradient ((B, d) rows become T = 1)."""
    return t.unsqueeze(1) if t.dim() == 2 else t.flatten(1, -2)


class Recorder:
    """Collects, for every recorded layer, its input (or x̂) and the gradient at its output, per example."""

    def __init__(self, names: list[str]) -> None:
        self.names = set(names)
        self.records: list[dict] = []
        self.seen: dict[str, int] = {}

    def _add(self, kind: str, w: str | None, b: str | None, a: Tensor | None, y: Tensor) -> None:
        w = w if w in self.names else None
        b = b if b in self.names else None
        if w is None and b is None:
            return
        for n in (w, b):
            if n is not None:
                self.seen[n] = self.seen.get(n, 0) + 1
        self.records.append({"kind": kind, "w": w, "b": b, "a": a, "g": None, "y": y, "live": y.requires_grad,
                             "shape": y.shape, "dtype": y.dtype})

    def backward(self, total: Tensor) -> None:
        """The loss gradient at every recorded output: autograd asked for those tensors only, so it never forms
        the (batch-summed) weight gradients the clipped sum replaces."""
        grads = torch.autograd.grad(total, [r["y"] for r in self.records], allow_unused=True)
        for r, g in zip(self.records, grads, strict=True):
            r["g"], r["y"] = (None if g is None else g.detach()), None

    def linear(self, w: str | None, b: str | None, x: Tensor, y: Tensor) -> None:
        self._add("linear", w, b, x.detach() if w in self.names else None, y)

    def layer_norm(self, w: str | None, b: str | None, x: Tensor, eps: float, y: Tensor) -> None:
        xhat = None
        if w in self.names:
            with torch.no_grad():
                xhat = F.layer_norm(x.detach(), (x.shape[-1],), eps=eps)
        self._add("layer_norm", w, b, xhat, y)

    def covered(self) -> bool:
        """Every trained tensor recorded exactly once, on a path that reaches the loss."""
        return (set(self.seen) == self.names and all(c == 1 for c in self.seen.values())
                and all(r["live"] for r in self.records))

    def _grad(self, rec: dict) -> Tensor:
        g = rec["g"]
        if g is None:  # the output never reached the loss: a zero gradient
            g = torch.zeros(rec["shape"], dtype=rec["dtype"])
        return _rows(g)

    def sq_norms(self) -> Tensor:
        """(B,) squared norms of each example's gradient over all recorded tensors."""
        total = None
        for rec in self.records:
            g = self._grad(rec)  # (B, T, o)
            parts = []
            if rec["w"] is not None:
                a = _rows(rec["a"])  # (B, T, i)
                if rec["kind"] == "layer_norm":
                    parts.append((g * a).sum(1).pow(2).sum(1))
                elif a.shape[1] ** 2 <= a.shape[2] * g.shape[2]:  # ghost norm: (B, T, T) Gram matrices
                    parts.append((torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)))
                else:
                    parts.append(torch.einsum("bto,bti->boi", g, a).pow(2).sum((1, 2)))
            if rec["b"] is not None:
                parts.append(g.sum(1).pow(2).sum(1))
            for p in parts:
                total = p if total is None else total + p
        return total

    def clipped_sum(self, factor: Tensor) -> dict[str, Tensor]:
        """``Σ_i factor_i · g_i`` for every recorded tensor."""
        out = {}
        for rec in self.records:
            g = self._grad(rec)
            g = g * factor[:, None, None].to(g.dtype)
            if rec["w"] is not None:
                a = _rows(rec["a"])
                if rec["kind"] == "layer_norm":
                    out[rec["w"]] = (g * a).sum((0, 1))
                else:
                    out[rec["w"]] = g.flatten(0, 1).t() @ a.flatten(0, 1)  # (o, i)
            if rec["b"] is not None:
                out[rec["b"]] = g.sum((0, 1))
        return out


@contextlib.contextmanager
def _module_hooks(tm: TangentModel, rec: Recorder) -> Iterator[None]:
    """The non-linear model: Linear and LayerNorm modules report to ``rec`` from forward hooks."""
    handles = []
    for name, m in tm.base.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, n=name: rec.linear(f"{n}.weight", f"{n}.bias" if mod.bias is not None else None,
                                                         inp[0], out)))
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, n=name: rec.layer_norm(
                    f"{n}.weight" if mod.weight is not None else None, f"{n}.bias" if mod.bias is not None else None,
                    inp[0], mod.eps, out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def clipped_sum(tm: TangentModel, state: State, labels: Tensor, loss: Loss, *, clip: float,
                twin: TangentModel | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """``(Σ_i g_i · min(1, C/‖g_i‖), ‖g_i‖)`` over the examples of ``state``: the clipped sum of per-example
    gradients of ``loss`` with respect to Δw and their norms, in one forward and one backward when every trained
    tensor is a Linear or LayerNorm parameter; otherwise by the per-example-gradient reference (``twin``: its
    :func:`nonlinear_twin`, for a tangent ``tm``)."""
    names = tm.linearized
    delta = tm.delta_dict()
    rec = Recorder(names)
    hooks = _module_hooks(tm, rec) if not tm.linear else contextlib.nullcontext()
    with torch.enable_grad(), recording(rec), hooks:
        z = tm.suffix(state)  # (B, C); tangent: f(w0) + J·Δ with autograd through the plain network at w0
        if rec.covered():
            rec.backward(loss(z, labels) * len(z))  # the losses are batch means of per-row terms
    if not rec.covered():
        grads = per_example_grads(tm, state, labels, loss, chunk=min(len(labels), 32), twin=twin)
        return clip_and_sum(grads, clip), per_example_norms(grads)
    norms = rec.sq_norms().sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's 1e-6 guard, as clip_and_sum
    summed = rec.clipped_sum(factor)
    return {n: summed[n].to(delta[n].dtype) for n in names}, norms
