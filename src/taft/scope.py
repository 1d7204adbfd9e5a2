"""Which parameters are linearized: presets plus peft-style patterns.

A scope is written as a comma-separated list, e.g. ``"last:1"``, ``"attn"``, ``"head"``, ``"all"``,
``"re:.*\\.bias"`` (regex, full match), ``"LayerNorm.weight"`` (name suffix), and ``"!pattern"`` to exclude.
The union of presets and include patterns, minus excludes, is linearized.

Presets (every family):

* ``all``: every parameter that reaches the output; ``last[:k]``: the last k blocks and the head;
* ``attn``: the attention q, k, v and output-projection weights (the linear-layers-only method);
  ``attn+bias``: those and their biases;
* ``bias``: every bias (BitFit); ``norm``: every LayerNorm's weight and bias; ``head``: the classifier head.

``all`` skips parameters the model marks ``requires_grad=False`` (fixed sin-cos position embeddings), unless the
whole model is frozen — then ``requires_grad`` says nothing and is ignored. Other presets and patterns name
parameters explicitly and take frozen ones too (peft freezes a base model's head, which a baseline still trains).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from taft.engine.family import Family, is_under
from taft.errors import TaftError

PRESETS = ("all", "last", "attn", "attn+bias", "bias", "norm", "head")


class ScopeError(TaftError):
    pass


@dataclass
class Scope:
    presets: list[str] = field(default_factory=list,
                               metadata={"help": "all | last[:k] | attn | attn+bias | bias | norm | head"})
    include: list[str] = field(default_factory=list, metadata={"help": "regex (re:...) or name suffix"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "patterns removed from the scope"})

    @classmethod
    def parse(cls, spec: str | Scope) -> Scope:
        if isinstance(spec, Scope):
            return spec
        out = cls()
        for raw in (s.strip() for s in spec.split(",")):
            if not raw:
                continue
            if raw.startswith("!"):
                out.exclude.append(raw[1:])
            elif raw.split(":")[0] in PRESETS and not raw.startswith("re:"):
                out.presets.append(raw)
            else:
                out.include.append(raw)
        if not (out.presets or out.include):
            raise ScopeError(f"scope {spec!r}: names nothing to linearize; use one of {PRESETS} or a pattern")
        return out

    def __str__(self) -> str:
        return ",".join([*self.presets, *self.include, *(f"!{e}" for e in self.exclude)])

    def to_dict(self) -> dict:
        return asdict(self)


def _matcher(pattern: str):
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda n: rx.fullmatch(n) is not None
    return lambda n: n == pattern or n.endswith("." + pattern)


def _bias_of(weight: str) -> str:
    """The bias beside a weight: ``x.weight`` → ``x.bias``, ``in_proj_weight`` → ``in_proj_bias``."""
    head, _, last = weight.rpartition(".")
    if last == "weight":
        return f"{head}.bias"
    return weight.removesuffix("weight") + "bias"


def _layer_norms(model) -> list[str]:
    """Qualified names of every LayerNorm module (torch's and its subclasses: timm, open_clip)."""
    from torch import nn

    return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and n]


def resolve_scope(scope: Scope, family: Family, names: list[str], frozen: frozenset[str] = frozenset()) -> list[str]:
    """Linearized parameter names, in model order. ``names`` are the parameters that reach the output; ``all``
    skips ``frozen`` ones (``requires_grad=False``)."""
    chosen: set[str] = set()
    present = set(names)
    for preset in scope.presets:
        kind, _, arg = preset.partition(":")
        if kind == "all":
            picked = set(names) - frozen
        elif kind == "last":
            k = int(arg) if arg else 1
            blocks = family.blocks()
            if not blocks:
                raise ScopeError(f"scope 'last:{k}': this {family.arch} model {family.no_blocks()}; use patterns")
            if not 1 <= k <= len(blocks):
                raise ScopeError(f"scope 'last:{k}': k must be in 1..{len(blocks)} for this model")
            prefixes = [p for s in blocks[-k:] for p in s.prefixes] + family.head_prefixes()
            picked = {n for n in names if is_under(n, prefixes)}
        elif kind in ("attn", "attn+bias"):
            w = family.attn_linear_weights()
            if not w:
                raise ScopeError(f"scope '{kind}': no attention weights known for {family.arch}; use patterns")
            picked = set(w)
            if kind == "attn+bias":
                picked |= {b for b in map(_bias_of, w) if b in present}
        elif kind == "bias":
            picked = {n for n in names if n.rpartition(".")[2] == "bias" or n.endswith("_bias")}
        elif kind == "norm":
            norms = _layer_norms(family.model)
            picked = {n for n in names if is_under(n, norms)}
        elif kind == "head":
            heads = family.head_only()
            if not heads:
                raise ScopeError(f"scope 'head': {family.arch} model has no head; wrap it in a classifier")
            picked = {n for n in names if is_under(n, heads)}
        else:  # pragma: no cover - Scope.parse only lets presets through
            raise ScopeError(f"unknown scope preset {preset!r}")
        if not picked:
            raise ScopeError(f"scope preset {preset!r} selects no trainable parameter of this {family.arch} model")
        chosen |= picked
    for pat in scope.include:
        hit = [n for n in names if _matcher(pat)(n)]
        if not hit:
            raise ScopeError(
                f"scope pattern {pat!r} matches no parameter. Available names:\n  " + "\n  ".join(names)
            )
        chosen.update(hit)
    for pat in scope.exclude:
        m = _matcher(pat)
        if not any(m(n) for n in names):
            raise ScopeError(f"scope exclusion {pat!r} matches no parameter. Available names:\n  " + "\n  ".join(names))
        chosen = {n for n in chosen if not m(n)}
    if not chosen:
        raise ScopeError(f"scope {scope}: selects no parameter after exclusions")
    return [n for n in names if n in chosen]
