"""``TangentModel``: the first-order Taylor expansion of a pretrained model around w0.

``f_lin(x; w0 + Δw) = f(x; w0) + J(x; w0)·Δw``, computed in one forward pass of closed-form rules.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

import taft.models  # noqa: F401  (registers the built-in families and their rules)
import taft.rules  # noqa: F401  (registers the closed-form rules)
from taft.engine.context import NonLinearContext, TangentContext
from taft.engine.dual import Dual
from taft.engine.family import Family, Stage, State, family_for, is_under
from taft.errors import UnsupportedError
from taft.scope import Scope, ScopeError, resolve_scope

CLS_NAME = "taft.cls"


def _key(name: str) -> str:
    # ParameterDict keys cannot contain '.'; ':' never occurs in torch parameter names.
    return name.replace(".", ":")


class TangentModel(nn.Module):
    """Wrap ``model`` so that only Δw (initialized to exactly 0) is trained, in the model's tangent space.

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
        super().__init__()
        if output not in ("full", "linear-part"):
            raise ValueError(f"TangentModel(output={output!r}): expected 'full' or 'linear-part'")
        if output == "linear-part" and not linear:
            raise ValueError("TangentModel(output='linear-part'): only a tangent model (linear=True) has a linearized "
                             "part J·Δw; a non-linear model's output is f(x; w0 + Δw)")
        if backward not in ("vjp", "tangent"):
            raise ValueError(f"TangentModel(backward={backward!r}): expected 'vjp' or 'tangent'")
        if master_dtype is not None and not master_dtype.is_floating_point:
            raise ValueError(f"TangentModel(master_dtype={master_dtype}): expected a floating dtype such as "
                             "torch.float32")
        self.master_dtype = master_dtype
        # Not a registered submodule: ``tm.parameters()`` is Δw only (what optimizers, Opacus and checkpoints see)
        # and ``state_dict`` holds Δw and w0; ``.to()`` / ``.train()`` still reach the base (see ``_apply``).
        object.__setattr__(self, "base", model)
        self.family: Family = family_for(model)
        self.scope = Scope.parse(scope)
        self.reinit = reinit
        self.linearize_cls = linearize_cls
        self.backward = backward
        self.force_fallback = force_fallback
        self.linear = linear
        self.output = output
        self.seed = seed
        self.fallback_modules: list[str] = []

        self._stages = self.family.stages()
        named = list(model.named_parameters())
        all_names = [n for n, _ in named]
        used = [n for n in all_names if any(is_under(n, s.prefixes) for s in self._stages)]
        frozen = frozenset(n for n, p in named if not p.requires_grad)
        if len(frozen) == len(all_names):  # frozen wholesale (a common habit before wrapping): no information
            frozen = frozenset()
        self.linearized: list[str] = resolve_scope(self.scope, self.family, used, frozen)
        lin_stages = [i for i, s in enumerate(self._stages) if any(is_under(n, s.prefixes) for n in self.linearized)]
        self.start = lin_stages[0]
        lin_blocks = [i for i in lin_stages if self._stages[i].block]
        reinit_blocks = [b for b in self.family.blocks() if any(is_under(n, b.prefixes) for n in self.linearized)]

        w0 = self._initial_w0(model, reinit_blocks)
        self.cls_stage: int | None = None
        if linearize_cls:
            if not lin_blocks:
                raise ScopeError(
                    f"linearize_cls=True needs a linearized block among the stages of the model's family "
                    f"({self.family.arch}: none in scope {self.scope}); widen the scope, or use linearize_cls=False "
                    "for models without a family"
                )
            self.cls_stage = lin_blocks[0]
            w0[CLS_NAME] = self.family.cls_init().to(next(model.parameters()))
            self.linearized.append(CLS_NAME)
        self.w0 = nn.Module()
        for n, t in w0.items():
            self.w0.register_buffer(_key(n), t)
        self.delta = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros_like(w0[n], dtype=master_dtype))
                                       for n in self.linearized})
        # every value a forward uses that is not the base model's own parameter: a w0 buffer (w0 + Δw when
        # non-linear); modules holding none of them run as themselves
        self._replaced = frozenset(w0)

    def _initial_w0(self, model: nn.Module, reinit_blocks: list[Stage]) -> dict[str, Tensor]:
        """Frozen copies of the base values of linearized (and re-initialized: ``reinit_blocks``) parameters."""
        params = dict(model.named_parameters())
        w0: dict[str, Tensor] = {}
        if self.reinit:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for block in reinit_blocks:
                    for prefix in block.prefixes:
                        fresh = copy.deepcopy(model.get_submodule(prefix))
                        self.family.reinit_module(fresh)
                        for n, p in fresh.named_parameters():
                            w0[f"{prefix}.{n}"] = p.detach().clone()
        for n in self.linearized:
            w0.setdefault(n, params[n].detach().clone())
        return w0

    # -- Δw as a name -> tensor dict --------------------------------------------------------------------
    def delta_dict(self) -> dict[str, Tensor]:
        """Δw keyed by the original parameter names (the trainable tensors themselves, not copies)."""
        return {n: self.delta[_key(n)] for n in self.linearized}

    def w0_dict(self) -> dict[str, Tensor]:
        return {n: getattr(self.w0, _key(n)) for n in self.linearized}

    @torch.no_grad()
    def load_delta(self, delta: Mapping[str, Tensor]) -> None:
        """Copy ``delta`` into Δw after checking names, shapes, dtype, device and finiteness."""
        expected, given = set(self.linearized), set(delta)
        if expected != given:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise ValueError(f"load_delta: names differ from the linearized scope; missing={missing} extra={extra}")
        for n in self.linearized:
            tgt, src = self.delta[_key(n)], delta[n]
            if src.shape != tgt.shape:
                raise ValueError(f"load_delta: {n!r} has shape {tuple(src.shape)}, expected {tuple(tgt.shape)}")
            if src.dtype != tgt.dtype:
                raise ValueError(
                    f"load_delta: {n!r} has dtype {src.dtype}, the model is {tgt.dtype}; "
                    f"convert one of them (tensor.to({tgt.dtype}) or model.to({src.dtype}))"
                )
            if src.device != tgt.device:
                raise ValueError(f"load_delta: {n!r} is on {src.device}, the model on {tgt.device}; move it first")
            if not torch.isfinite(src).all():
                raise ValueError(f"load_delta: {n!r} contains NaN or inf; refusing to load it")
        for n in self.linearized:
            self.delta[_key(n)].copy_(delta[n])

    # -- forward ----------------------------------------------------------------------------------------
    def base_params(self) -> dict[str, Tensor]:
        """Every parameter at w0 (re-initialized values included, the fresh CLS token too), detached."""
        params = {n: p.detach() for n, p in self.base.named_parameters()}
        params.update({k.replace(":", "."): t for k, t in self.w0.named_buffers(recurse=False)})
        return params

    def _compute_deltas(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Δw in the dtype the forward runs in (a differentiable cast of the master copy when their dtypes differ)."""
        out = self.delta_dict()
        if self.master_dtype is not None:
            out = {n: d if d.dtype == params[n].dtype else d.to(params[n].dtype) for n, d in out.items()}
        return out

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

    def _apply(self, fn, recurse=True):
        self.base._apply(fn, recurse)
        if self.master_dtype is None:
            return super()._apply(fn, recurse)
        master = {k: (p.data, None if p.grad is None else p.grad.data) for k, p in self.delta.items()}
        super()._apply(fn, recurse)
        for k, p in self.delta.items():  # the master copy goes where fn sends it, in its own dtype, values intact
            data, grad = master[k]
            p.data = data.to(device=p.device)
            if grad is not None:
                p.grad = grad.to(device=p.device)
        return self

    def train(self, mode: bool = True):
        self.base.train(mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"arch={self.family.arch}, scope={self.scope}, linearized={len(self.linearized)} tensors, "
            f"start_stage={self._stages[self.start].name}, backward={self.backward}, linear={self.linear}"
            + (f", output={self.output}" if self.output != "full" else "")
        )
