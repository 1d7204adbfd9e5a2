"""The tangent model, in two classes with one job each.

* :class:`~taft.tangent_model.weights.TangentWeights` (``weights.py``) holds the weights: which parameters the
  scope selects, their w0 (copied, re-initialized, or a fresh CLS token) as buffers, Δw as parameters, and their
  I/O as ``{name: tensor}`` dicts.
* :class:`~taft.tangent_model.model.TangentModel` (``model.py``) subclasses it and runs the network in stages
  with the tangent rules: the frozen prefix, then f(x; w0) + J(x; w0)·Δw.

A subclass rather than a submodule, so that parameter and buffer names stay ``delta.*`` and ``w0.*`` (what
optimizers, DDP, per-example gradients and checkpoints key on).
"""

from taft.tangent_model.model import TangentModel
from taft.tangent_model.weights import CLS_NAME, TangentWeights, _key  # noqa: F401  (_key: imported from here)

__all__ = ["CLS_NAME", "TangentModel", "TangentWeights"]
