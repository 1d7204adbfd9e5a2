"""``TangentModel``: the first-order Taylor expansion of a pretrained model around w0.

``f_lin(x; w0 + Δw) = f(x; w0) + J(x; w0)·Δw``, computed in one forward pass of closed-form rules, stage by stage.
The weights it runs at (w0, Δw and their I/O) are :class:`~taft.tangent_model.weights.TangentWeights`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import taft.models  # noqa: F401  (registers the built-in families and their rules)
import taft.rules  # noqa: F401  (registers the closed-form rules)
from taft.engine.context import NonLinearContext, TangentContext
from taft.engine.dual import Dual
from taft.engine.family import State, is_under
from taft.errors import UnsupportedError
from taft.scope import Scope
from taft.tangent_model.weights import CLS_NAME, TangentWeights


class TangentModel(TangentWeights):
    """Wrap ``model`` so that only Δw (initialized to exactly 0) is trained, in the model's tangent space.

    This class runs the network in stages with the tangent rules (:meth:`prefix`, :meth:`advance`, :meth:`suffix`,
    :meth:`forward`); the weights it runs at — w0 and Δw, :meth:`delta_dict`, :meth:`w0_dict`, :meth:`load_delta`,
    :meth:`base_params`, moves between devices and dtypes — come from its base class
    :class:`~taft.tangent_model.weights.TangentWeights`, under the same names (``delta.*``, ``w0.*``).

    Args:
        model: any ``nn.Module``. Known families (HF BERT/RoBERTa/ViT/CLIP vision, timm ViT, open_clip ViT and
            taft classifiers around them) run closed-form rules; anything else — other types, subclasses that
            change the forward, forward hooks, configurations a family does not implement — runs the exact
            ``torch.func.jvp`` fallback (listed in ``fallback_modules``). The module is never modified.
        scope: which parameters are linearized (see :mod:`taft.scope`), e.g. ``"last:1"``, ``"attn"``.
        reinit: re-initialize the linearized blocks (seeded) before linearizing (the paper's PT=F).
        linearize_cls: feed a fresh, linearized CLS token into the first linearized block (CLS=T).
        backward: ``"vjp"`` computes ∂L/∂Δw as the plain network's VJP at w0 (training memory of ordinary
            fine-tuning); ``"tangent"`` differentiates through the tangent pass (the reference).
        force_fallback: run every module through the ``torch.func.jvp`` fallback (the reference for tests).
        linear: ``False`` turns the wrapper into ordinary (non-linear) fine-tuning of the same parameters,
            ``f(x; w0 + Δw)`` through the model's own forward — the NLFT / LoRA baselines share the scope, the
            frozen-prefix cache and the Δw checkpoint format with TAFT.
        master_dtype: keep Δw (the trainable master copy) in this dtype, e.g. ``torch.float32`` for a model run in
            bfloat16 / float16: each forward uses Δw rounded to the model's dtype, gradients reach the master copy
            through that cast, and optimizer steps too small for the low precision still accumulate. ``.to()``
            moves the master copy between devices but never changes its dtype. ``None``: Δw follows the model.
        output: ``"full"`` returns f(x; w0) + J·Δw; ``"linear-part"`` returns J(x; w0)·Δw alone (the paper's
            "predictions from the linearized part only", used for its private runs): still linear in Δw, with
            the pretrained model's own output dropped. Tangent models only.

    Cost: one forward of the suffix that starts at the first linearized stage, about 2-3x a plain forward of
    that suffix; stages before it run as the plain model under ``no_grad``.

    >>> tm = TangentModel(bert, "last:1")                       # doctest: +SKIP
    >>> out = tm(input_ids, attention_mask)                     # f(x; w0) + J·Δw   # doctest: +SKIP
    >>> f0, jvp = tm.forward_parts(input_ids, attention_mask)   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        scope: str | Scope = "all",
        *,
        reinit: bool = False,
        linearize_cls: bool = False,
        backward: str = "vjp",
        force_fallback: bool = False,
        linear: bool = True,
        seed: int = 0,
        master_dtype: torch.dtype | None = None,
        output: str = "full",
    ) -> None:
        if output not in ("full", "linear-part"):
            raise ValueError(f"TangentModel(output={output!r}): expected 'full' or 'linear-part'")
        if output == "linear-part" and not linear:
            raise ValueError("TangentModel(output='linear-part'): only a tangent model (linear=True) has a linearized "
                             "part J·Δw; a non-linear model's output is f(x; w0 + Δw)")
        if backward not in ("vjp", "tangent"):
            raise ValueError(f"TangentModel(backward={backward!r}): expected 'vjp' or 'tangent'")
        super().__init__(model, scope, reinit=reinit, linearize_cls=linearize_cls, seed=seed,
                         master_dtype=master_dtype)
        self.backward = backward
        self.force_fallback = force_fallback
        self.linear = linear
        self.output = output
        self.fallback_modules: list[str] = []

        self._stages = self.family.stages()
        lin_stages = [i for i, s in enumerate(self._stages)
                      if any(is_under(n, s.prefixes) for n in self.linearized if n != CLS_NAME)]
        self.start = lin_stages[0]
        # the fresh CLS token (if any) enters at the first linearized block (TangentWeights checked that there is one)
        self.cls_stage: int | None = next(i for i in lin_stages if self._stages[i].block) if linearize_cls else None

    # -- forward ----------------------------------------------------------------------------------------
    def _context(self, with_deltas: bool = True) -> TangentContext:
        params = self.base_params()
        replaced = self._replaced
        if not with_deltas:
            return TangentContext(params, {}, replaced=replaced)
        deltas = self._compute_deltas(params)
        if not self.linear:
            for n, d in deltas.items():
                params[n] = params[n] + d
            return NonLinearContext(params, frozenset(self.linearized), replaced=replaced)
        return TangentContext(
            params, deltas, vjp=self.backward == "vjp", force_fallback=self.force_fallback, replaced=replaced,
        )

    def prefix(self, *args, **kwargs) -> State:
        """Run the frozen stages before the first linearized one (plain model, no grad). Cacheable."""
        why = self.family.changed()
        if why is not None:
            raise UnsupportedError(
                f"TangentModel: the model changed after it was wrapped ({why}); its {self.family.arch} stages no "
                "longer compute its forward. Remove the change, or build the TangentModel again (it then runs the "
                "exact fallback)"
            )
        state = self.family.prepare(*args, **kwargs)
        if self.start == 0:
            return state
        ctx = self._context(with_deltas=False)
        with torch.no_grad():
            for i in range(self.start):
                state = self.family.run_stage(ctx, i, state)
        return state

    def advance(self, state: State, start: int) -> State:
        """The prefix state of this model from the prefix state of a model on the same base whose frozen stages end
        earlier, at stage ``start`` (the stages ``start .. self.start`` run as the plain model, no grad): features
        cached for a late start give those of a later one without running the earlier stages again."""
        if not 0 <= start <= self.start:
            raise ValueError(f"TangentModel.advance: start={start} is not a stage before this model's first "
                             f"linearized one ({self.start})")
        ctx = self._context(with_deltas=False)
        with torch.no_grad():
            for i in range(start, self.start):
                state = self.family.run_stage(ctx, i, state)
        return state

    def suffix_parts(self, state: State) -> tuple[Tensor, Tensor]:
        """(f(x; w0), J·Δw) from a prefix state."""
        ctx = self._context()
        for i in range(self.start, len(self._stages)):
            if i == self.cls_stage:
                state = State(self._insert_cls(ctx, state.h), state.aux)
            state = self.family.run_stage(ctx, i, state)
        self.fallback_modules = ctx.fallback_modules
        out = self.family.output(state)
        t = out.tangent if out.tangent is not None else torch.zeros_like(out.primal)
        return out.primal, t

    def _insert_cls(self, ctx: TangentContext, h: Dual) -> Dual:
        cls = ctx.param(CLS_NAME)
        B, _, D = h.primal.shape
        p = torch.cat([cls.primal.expand(B, 1, D), h.primal[:, 1:]], dim=1)  # (B, T, D)
        if cls.tangent is None:  # non-linear mode: the token is trained directly
            return Dual(p, None)
        with ctx.tangent_mode():
            rest = h.tangent[:, 1:] if h.tangent is not None else torch.zeros_like(h.primal[:, 1:])
            t = torch.cat([cls.tangent.expand(B, 1, D), rest], dim=1)
        return Dual(p, t)

    def suffix(self, state: State) -> Tensor:
        """The model's output from a prefix state: f(x; w0) + J·Δw, or J·Δw alone (``output="linear-part"``)."""
        f0, t = self.suffix_parts(state)
        if self.output == "linear-part":
            # f0 − sg(f0) is exactly 0 in value; in the vjp backward it carries the gradient (J·Δw is computed
            # under no_grad and autograd sees the plain network at w0 through f0), so ∂/∂Δw is still Jᵀg
            return t + (f0 - f0.detach())
        return f0 + t

    def forward_parts(self, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """``(f(x; w0), J(x; w0)·Δw)`` separately, in one pass."""
        return self.suffix_parts(self.prefix(*args, **kwargs))

    def forward(self, *args, **kwargs) -> Tensor:
        return self.suffix(self.prefix(*args, **kwargs))

    def extra_repr(self) -> str:
        return (
            f"arch={self.family.arch}, scope={self.scope}, linearized={len(self.linearized)} tensors, "
            f"start_stage={self._stages[self.start].name}, backward={self.backward}, linear={self.linear}"
            + (f", output={self.output}" if self.output != "full" else "")
        )
