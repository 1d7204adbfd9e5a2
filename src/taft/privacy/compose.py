"""Private shard models composed by averaging, and what the composed model guarantees.

* **Disjoint shards compose in parallel.** Each record lies in one shard, so changing it changes one shard's
  training run only: the average of K shard models trained at (ε_k, δ_k) is (max ε_k, max δ_k)-DP
  (:func:`parallel_guarantee`). Averaging is post-processing and costs nothing.
* **Retraining adds up.** Retraining a shard after a deletion releases another model trained on the same
  remaining records; both releases count against those records, and their ε composes sequentially
  (:func:`sequential_epsilon` composes the runs' accountant histories with Opacus, tighter than summing ε).

>>> delta, guarantee = compose_private([d1, d2], sizes=[500, 480], privacy=[r1.privacy, r2.privacy])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from taft.config import ConfigError
from taft.delta import Delta, weighted_average

_KEYS = ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps_taken", "accountant")


def _check(privacy: Sequence[Mapping], what: str) -> None:
    if not privacy:
        raise ConfigError(f"{what}: no privacy report given")
    for i, p in enumerate(privacy):
        if p is None:
            raise ConfigError(f"{what}: run #{i} was not trained privately (results.json has no privacy record); "
                              "its data have no guarantee")
        missing = [k for k in _KEYS if k not in p]
        if missing:
            raise ConfigError(f"{what}: run #{i}'s privacy record lacks {missing}")


def parallel_guarantee(privacy: Sequence[Mapping]) -> dict:
    """(ε, δ) of a model computed from private runs on **disjoint** shards: the largest ε and δ of any shard."""
    _check(privacy, "parallel_guarantee")
    return {"epsilon": max(float(p["epsilon"]) for p in privacy), "delta": max(float(p["delta"]) for p in privacy),
            "composition": "parallel (disjoint shards)", "shards": len(privacy)}


def sequential_epsilon(privacy: Sequence[Mapping], delta: float | None = None, accountant: str | None = None) -> float:
    """ε of releasing every run in ``privacy`` when they trained on the **same** records (e.g. a shard and its
    retraining after a deletion), at ``delta`` (default: the runs' largest δ). Composes the accountant histories
    ``(σ, q, steps)`` of all runs in one Opacus accountant."""
    from taft.privacy.accounting import _accountant

    _check(privacy, "sequential_epsilon")
    delta = max(float(p["delta"]) for p in privacy) if delta is None else delta
    acc = _accountant(accountant or privacy[0]["accountant"])
    acc.history = [(float(p["noise_multiplier"]), float(p["sample_rate"]), int(p["steps_taken"]))
                   for p in privacy if int(p["steps_taken"]) > 0]
    return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0


def compose_private(deltas: Sequence[Delta], *, sizes: Sequence[float], privacy: Sequence[Mapping]
                    ) -> tuple[dict[str, Tensor], dict]:
    """Average private shard Δw (weighted by shard size) and state the composed model's guarantee.

    The caller asserts that the shards are disjoint (the shard store's assignment guarantees it); the guarantee is
    then :func:`parallel_guarantee`."""
    if len(deltas) != len(privacy):
        raise ConfigError(f"compose_private: {len(deltas)} Δw but {len(privacy)} privacy records")
    return weighted_average(deltas, sizes), parallel_guarantee(privacy)
