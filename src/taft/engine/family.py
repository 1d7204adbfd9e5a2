"""Model families: how a model's forward splits into stages, so that the tangent pass can start late.

A family binds one model instance and describes its forward as an ordered list of stages (embeddings,
blocks, final norm/head). Every stage runs through ``ctx.call`` on the model's own submodules, so stages with
no tangent flowing in and no linearized parameter inside run as the plain model. ``prefix`` (stages before the
first linearized one, under ``no_grad``) returns a :class:`State` that can be cached and fed to ``suffix``.

One matching policy for every family (:meth:`Family.matches`): the model is an instance of a registered type
or of a subclass that keeps every method the stages re-implement (``own_methods``), carries no instance-level
``forward`` and no forward hooks / pre-hooks, the submodules whose forward the stages bypass
(:meth:`Family.bypassed`) pass the same test, and the family implements the model's configuration
(:meth:`Family.unsupported`). Anything else runs the exact generic fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from taft.engine.context import TangentContext
from taft.engine.dual import Dual
from taft.engine.registry import customized, keeps_methods, primary_output
from taft.errors import TaftError, UnsupportedError


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


def runs_own_code(module: nn.Module, types: tuple[type, ...], methods: tuple[str, ...] = ("forward",)) -> bool:
    """Whether ``module`` computes what one of ``types`` computes: its type is one of them or a subclass that
    keeps each of ``methods``, and no forward is set on the instance and no forward hook / pre-hook is attached."""
    return not customized(module) and any(keeps_methods(type(module), t, methods) for t in types)


class Family:
    """Base class. ``root`` qualifies every name when the model sits inside another (a classifier)."""

    arch: str = "generic"
    model_types: tuple[type, ...] = ()
    own_methods: tuple[str, ...] = ("forward",)  # methods of the model class that the stages re-implement

    def __init__(self, model: nn.Module, root: str = "") -> None:
        self.model = model
        self.root = root

    @classmethod
    def bypassed(cls, model: nn.Module) -> dict[str, tuple[type, ...]]:
        """Submodules (qualified names inside ``model``) whose own forward the stages re-implement instead of
        calling, with the types whose forward they re-implement."""
        return {}

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why the stages do not implement this model's configuration (it then runs the generic fallback)."""
        return None

    @classmethod
    def mismatch(cls, model: nn.Module) -> str | None:
        """Why ``model`` is not computed by this family's stages; ``None`` when it is."""
        if not runs_own_code(model, cls.model_types, cls.own_methods):
            if customized(model):
                return f"{type(model).__name__} has a forward hook / pre-hook or an instance-level forward"
            return (f"{type(model).__name__} is not one of {[t.__name__ for t in cls.model_types]} "
                    f"with their {', '.join(cls.own_methods)}")
        for path, types in cls.bypassed(model).items():
            try:
                sub = model.get_submodule(path)
            except AttributeError:
                return f"{type(model).__name__} has no submodule {path!r}"
            if not runs_own_code(sub, types):
                return f"submodule {path!r} ({type(sub).__name__}) is replaced, overrides forward, or has hooks"
        return cls.unsupported(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls.mismatch(model) is None

    def changed(self) -> str | None:
        """Why the model no longer matches this family (a hook added after wrapping); ``None`` if unchanged."""
        return type(self).mismatch(self.model)

    def blocks(self) -> list[Stage]:
        """The transformer blocks, in forward order (what ``last:k`` counts and ``reinit`` re-initializes)."""
        return [s for s in self.stages() if s.block]

    def no_blocks(self) -> str:
        """Why :meth:`blocks` is empty (for the ``last:k`` error)."""
        return "has no known blocks"

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


def reinit_hf(model: nn.Module, module: nn.Module) -> None:
    """Re-initialize ``module`` (inside the Hugging Face ``model``) with the model's own ``_init_weights``."""
    for p in module.parameters():  # from_pretrained marks loaded tensors so that HF's init skips them
        if hasattr(p, "_is_hf_initialized"):
            del p._is_hf_initialized
    for m in module.modules():
        model._init_weights(m)


def _is_block_list(m: nn.Module) -> bool:
    """A ``ModuleList`` (or a ``Sequential`` of non-torch modules) of one module type that holds parameters."""
    children = list(m.children())
    if not children or len({type(c) for c in children}) != 1 or not any(True for _ in m.parameters()):
        return False
    if isinstance(m, nn.ModuleList):
        return True
    return isinstance(m, nn.Sequential) and not type(children[0]).__module__.startswith("torch.nn")


def detect_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the outermost lists of same-type blocks (``encoder.layer``, ``transformer.layer``,
    ``layers``, ``blocks``, …) in ``model``."""
    found: list[str] = []
    for name, m in model.named_modules():
        if name and _is_block_list(m) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


class GenericFamily(Family):
    """Any ``nn.Module``: one stage, the whole model through the ``torch.func.jvp`` fallback.

    For scopes only, the blocks are detected as the model's one list of same-type modules (``encoder.layer``
    of RoBERTa / ELECTRA / DeBERTa / DINOv2, ``transformer.layer`` of DistilBERT, …); ``last:k`` selects the
    last k of them plus the top-level modules registered after them (a final norm; never a ``pooler``). The
    forward is always the model's own, so every scope is exact.
    """

    arch = "generic"

    def __init__(self, model: nn.Module, root: str = "", note: str | None = None) -> None:
        super().__init__(model, root)
        self.note = note  # why no family's closed form applies (None: no family knows the type)
        self._lists: list[str] | None = None

    @property
    def _block_lists(self) -> list[str]:
        if self._lists is None:  # only scopes need it: not on every Classifier.forward
            self._lists = detect_blocks(self.model)
        return self._lists

    @property
    def _blocks(self) -> str | None:
        return self._block_lists[0] if len(self._block_lists) == 1 else None

    @classmethod
    def mismatch(cls, model: nn.Module) -> str | None:
        return None

    def stages(self) -> list[Stage]:
        return [Stage("model", (self.root.rstrip("."),) if self.root else ("",))]

    def no_blocks(self) -> str:
        if len(self._block_lists) > 1:
            return f"has several lists of blocks {self._block_lists}: cannot tell which one 'last:k' counts"
        return super().no_blocks()

    def blocks(self) -> list[Stage]:
        if self._blocks is None:
            return []
        n = len(self.model.get_submodule(self._blocks))
        return [Stage(f"{self._blocks}.{i}", (self.q(f"{self._blocks}.{i}"),), block=True) for i in range(n)]

    def head_prefixes(self) -> list[str]:
        if self._blocks is None:
            return []
        top = self._blocks.split(".")[0]
        names = [n for n, _ in self.model.named_children()]
        after = names[names.index(top) + 1:]
        return [self.q(n) for n in after if "pooler" not in n and any(True for _ in self.model.get_submodule(n)
                                                                          .parameters())]

    def hidden_size(self) -> int:
        cfg = getattr(self.model, "config", None)
        for attr in ("hidden_size", "dim", "d_model", "embed_dim", "width"):
            for src in (cfg, self.model):
                v = getattr(src, attr, None)
                if isinstance(v, int):
                    return v
        raise TaftError(f"{type(self.model).__name__}: unknown feature width; pass feature_dim= to the Classifier")

    def reinit_module(self, module: nn.Module) -> None:
        if hasattr(self.model, "_init_weights"):
            reinit_hf(self.model, module)
        else:
            super().reinit_module(module)

    def prepare(self, *args, **kwargs) -> State:
        return State(None, {"args": args, "kwargs": kwargs})

    def run_stage(self, ctx, i, state):
        out = ctx.call(self.model, self.root.rstrip("."), *state.aux["args"], **state.aux["kwargs"])
        return State(out, state.aux)


# Arguments of Hugging Face forwards that change only the output's format, never the tensor a family computes.
HF_FORMAT_ONLY = frozenset({"output_attentions", "output_hidden_states", "return_dict"})


def refuse_arguments(arch: str, kwargs: dict, allowed: frozenset[str] = HF_FORMAT_ONLY) -> None:
    """Raise :class:`UnsupportedError` naming every argument in ``kwargs`` that is given (not ``None``) and not
    ``allowed``: an argument the stages would ignore must not be dropped silently."""
    bad = sorted(k for k, v in kwargs.items() if v is not None and k not in allowed)
    if bad:
        raise UnsupportedError(f"{arch} family: argument(s) {bad} are not supported by the closed form; call the "
                               "model without them, or wrap it in a module of your own (which runs the exact fallback)")


_FAMILIES: list[type[Family]] = []


def register_family(cls: type[Family]) -> type[Family]:
    _FAMILIES.append(cls)
    return cls


def family_for(model: nn.Module, root: str = "") -> Family:
    """The registered family that computes ``model``'s forward exactly, else the generic fallback family. The
    built-in families register when ``taft.models`` is imported (``import taft`` does it)."""
    note = None
    for cls in _FAMILIES:
        if isinstance(model, cls.model_types):
            why = cls.mismatch(model)
            if why is None:
                return cls(model, root)
            note = note or f"{cls.arch}: {why}"
    return GenericFamily(model, root, note)
