"""Model families: how a model's forward splits into stages, so that the tangent pass can start late.

A family binds one model instance and describes its forward as an ordered list of stages (embeddings,
blocks, final norm/head). Every stage runs through ``ctx.call`` on the model's own submodules, so stages with
no tangent flowing in and no linearized parameter inside run as the plain model. ``prefix`` (stages before the
first linearized one, under ``no_grad``) returns a :class:`State` that can be cached and fed to ``suffix``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from taft.engine.context import TangentContext, primary_output
from taft.engine.dual import Dual


@dataclass
class State:
    """What flows between stages: the hidden Dual and auxiliary inputs (masks, ids) that carry no tangent."""

    h: Dual | None
    aux: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    prefixes: tuple[str, ...]  # qualified names of the modules / parameters this stage owns
    block: bool = False  # a transformer block (counted by the ``last:k`` preset)


def is_under(name: str, prefixes) -> bool:
    """Whether parameter ``name`` belongs to one of the module ``prefixes`` ("" is the whole model)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


class Family:
    """Base class. ``root`` qualifies every name when the model sits inside another (a classifier)."""

    arch: str = "generic"
    model_types: tuple[type, ...] = ()

    def __init__(self, model: nn.Module, root: str = "") -> None:
        self.model = model
        self.root = root

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, cls.model_types)

    def q(self, name: str) -> str:
        return f"{self.root}{name}"

    # -- structure ------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def head_prefixes(self) -> list[str]:
        """Final norm and head: included by the ``last:k`` preset and selected by ``head``."""
        return []

    def head_only(self) -> list[str]:
        """What the ``head`` preset selects (a classifier narrows it to its own linear head)."""
        return self.head_prefixes()

    def attn_linear_weights(self) -> list[str]:
        """Attention q, k, v and output-projection weights (the linear-layers-only method)."""
        return []

    def hidden_size(self) -> int:
        raise NotImplementedError

    def cls_init(self) -> Tensor:
        """Initial value of a fresh CLS token linearized at the first linearized block."""
        return torch.zeros(self.hidden_size())

    def reinit_module(self, module: nn.Module) -> None:
        """Re-initialize ``module`` in place the way the family initializes a fresh one."""
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)  # MHA: private
            if reset is not None:
                reset()

    # -- forward --------------------------------------------------------------------------------------
    def prepare(self, *args, **kwargs) -> State:
        raise NotImplementedError

    def run_stage(self, ctx: TangentContext, i: int, state: State) -> State:
        raise NotImplementedError

    def output(self, state: State) -> Dual:
        return state.h

    # -- the model's own forward, for references and checks ---------------------------------------------
    def select_output(self, out) -> Tensor:
        """The tensor of the model's own forward output that the stages compute (for the reference)."""
        return primary_output(out)

    def example_inputs(self, batch: int, generator: torch.Generator) -> tuple[tuple, dict]:
        """Random valid inputs (args, kwargs) for checks; padded rows where the model takes a mask."""
        raise NotImplementedError(f"{type(self).__name__}: no example inputs; pass inputs explicitly")


class GenericFamily(Family):
    """Any ``nn.Module``: one stage, the whole model through the ``torch.func.jvp`` fallback."""

    arch = "generic"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def stages(self) -> list[Stage]:
        return [Stage("model", (self.root.rstrip("."),) if self.root else ("",))]

    def prepare(self, *args, **kwargs) -> State:
        return State(None, {"args": args, "kwargs": kwargs})

    def run_stage(self, ctx, i, state):
        out = ctx.call(self.model, self.root.rstrip("."), *state.aux["args"], **state.aux["kwargs"])
        return State(out, {})


_FAMILIES: list[type[Family]] = []


def register_family(cls: type[Family]) -> type[Family]:
    _FAMILIES.append(cls)
    return cls


def family_for(model: nn.Module, root: str = "") -> Family:
    import taft.models  # noqa: F401  (registers the built-in families and their rules)

    for cls in _FAMILIES:
        if cls.matches(model):
            return cls(model, root)
    return GenericFamily(model, root)
