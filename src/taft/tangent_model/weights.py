"""``TangentWeights``: the values a tangent model runs at — w0 (frozen) and Δw (trained) — keyed by parameter name.

It knows which parameters the scope selects and what they start from; it never runs the network
(:class:`~taft.tangent_model.TangentModel` does, with these weights).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

import taft.models  # noqa: F401  (registers the built-in families, which the scope resolves against)
from taft.engine.family import Family, Stage, family_for, is_under
from taft.scope import Scope, ScopeError, resolve_scope

CLS_NAME = "taft.cls"


def _key(name: str) -> str:
    # ParameterDict keys cannot contain '.'; ':' never occurs in torch parameter names.
    return name.replace(".", ":")


class TangentWeights(nn.Module):
    """w0 and Δw of the parameters ``scope`` selects in ``model``, keyed by the model's own parameter names.

    ``self.w0`` holds w0 as buffers: copies of the base values, or fresh ones for re-initialized blocks
    (``reinit``) and for a linearized CLS token (``linearize_cls``, named ``"taft.cls"``). ``self.delta`` holds
    Δw as parameters, exactly 0 at the start, in ``master_dtype`` when given. Keys replace ``.`` with ``:``
    (``delta["encoder:layer:1:output:dense:weight"]``); :meth:`delta_dict` and :meth:`w0_dict` use the original
    names. ``model`` is held but not registered: ``parameters()`` is Δw only, ``state_dict()`` is w0 and Δw, and
    ``.to()`` / ``.train()`` still reach the model. The model is never modified.

    Args: as :class:`~taft.tangent_model.TangentModel` (``model``, ``scope``, ``reinit``, ``linearize_cls``,
    ``seed``, ``master_dtype``), which subclasses this to run the network with these weights.

    >>> w = TangentWeights(bert, "last:1")                      # doctest: +SKIP
    >>> w.load_delta({n: torch.zeros_like(t) for n, t in w.w0_dict().items()})   # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        scope: str | Scope = "all",
        *,
        reinit: bool = False,
        linearize_cls: bool = False,
        seed: int = 0,
        master_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if master_dtype is not None and not master_dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}(master_dtype={master_dtype}): expected a floating dtype such "
                             "as torch.float32")
        self.master_dtype = master_dtype
        # Not a registered submodule: ``parameters()`` is Δw only (what optimizers, Opacus and checkpoints see)
        # and ``state_dict`` holds Δw and w0; ``.to()`` / ``.train()`` still reach the base (see ``_apply``).
        object.__setattr__(self, "base", model)
        self.family: Family = family_for(model)
        self.scope = Scope.parse(scope)
        self.reinit = reinit
        self.linearize_cls = linearize_cls
        self.seed = seed

        stages = self.family.stages()
        named = list(model.named_parameters())
        all_names = [n for n, _ in named]
        used = [n for n in all_names if any(is_under(n, s.prefixes) for s in stages)]
        frozen = frozenset(n for n, p in named if not p.requires_grad)
        if len(frozen) == len(all_names):  # frozen wholesale (a common habit before wrapping): no information
            frozen = frozenset()
        self.linearized: list[str] = resolve_scope(self.scope, self.family, used, frozen)
        reinit_blocks = [b for b in self.family.blocks() if any(is_under(n, b.prefixes) for n in self.linearized)]

        w0 = self._initial_w0(model, reinit_blocks)
        if linearize_cls:
            if not any(s.block and any(is_under(n, s.prefixes) for n in self.linearized) for s in stages):
                raise ScopeError(
                    f"linearize_cls=True needs a linearized block among the stages of the model's family "
                    f"({self.family.arch}: none in scope {self.scope}); widen the scope, or use linearize_cls=False "
                    "for models without a family"
                )
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

    # -- Δw and w0 as name -> tensor dicts ----------------------------------------------------------------
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

    # -- the values a forward runs at ----------------------------------------------------------------------
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

    # -- moves: the unregistered base goes along; the master copy keeps its dtype ---------------------------
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
