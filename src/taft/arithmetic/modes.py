"""Fine-tuning modes that produce task vectors of a shared encoder.

Every mode trains encoder parameters only (the task heads are frozen, so τ touches the encoder alone) and is a
``(scope, linear)`` pair for :class:`~taft.tangent_model.TangentModel`:

* ``nonlinear``: ordinary fine-tuning of the whole encoder; applied in weight space, ``f(x; w0 + Στ)``.
* ``ntk``: the whole encoder linearized (``f(x; w0) + J(x; w0)·Δw``); applied in tangent space,
  ``f(x; w0) + J·Σατ`` — the same wrapper with ``Δw = Σατ``.
* ``linear-layers``: attention q, k, v and output-projection weights only, biases frozen, model non-linear
  (Jin et al.); ``attn+bias`` adds their biases.
* ``attn-block`` / ``attn-block+bias``: every linear layer of the attention block. In all five supported
  families (BERT, timm ViT, HF ViT, HF CLIP vision, open_clip) the attention block holds exactly the q, k, v
  (or fused qkv / in_proj) and output projections, so these select the same tensors as ``linear-layers`` /
  ``attn+bias`` (``tests/arithmetic/test_modes.py`` checks it); they are kept as names for the seed's ablation.
* ``taft-last1``: TAFT of the last block (tangent space), for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from taft.errors import TaftError

HEAD_EXCLUDE = r"!re:head\..*"  # the Classifier's head: frozen in every mode


class ModeError(TaftError):
    pass


@dataclass(frozen=True)
class Mode:
    name: str
    scope: str
    linear: bool  # True: applied in tangent space (f0 + J·Δw); False: in weight space

    @property
    def space(self) -> str:
        return "tangent" if self.linear else "weight"


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("nonlinear", f"all,{HEAD_EXCLUDE}", linear=False),
    Mode("ntk", f"all,{HEAD_EXCLUDE}", linear=True),
    Mode("linear-layers", "attn", linear=False),
    Mode("attn+bias", "attn+bias", linear=False),
    Mode("attn-block", "attn", linear=False),
    Mode("attn-block+bias", "attn+bias", linear=False),
    Mode("taft-last1", f"last:1,{HEAD_EXCLUDE}", linear=True),
)}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ModeError(f"unknown task-vector mode {name!r}; use one of {', '.join(MODES)}")
    return MODES[name]
