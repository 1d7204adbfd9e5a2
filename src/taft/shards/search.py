"""Equal tuning for shard stores: one grid for every method, selected on the validation split only.

:func:`search_store` trains the K shard models of every grid point (all shards at once, batched) from the shared
w0 and the prefix features computed once, and scores each point on the validation split by the rule the method is
used with: the composed model (the size-weighted average of the shards' Δw: composed TAFT, Model Soup) or the
majority vote of the shard models (SISA). It keeps the best point (ties: the earlier one in grid order) and
returns it with the whole grid; the test split is never read. With ``store``, the chosen setting then trains the
store itself.

Validation examples are never training examples of a store (a seeded carve-out, or the task's own dev file), so
they are not subject to removal: a setting chosen on them stays valid whatever is forgotten later.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from taft.config import ConfigError, TrainConfig
from taft.data.shards import shard_jobs
from taft.delta import weighted_average
from taft.shards.create import train_store
from taft.shards.training import ShardTrainer, TrainingDiverged, accuracy, check_shard_config, vote_counts
from taft.train.rundir import write_json
from taft.train.search import grid_points

# The store's default grid, the same for every method (equal tuning): the learning rate and the shards' budget.
DEFAULT_STORE_GRID: dict[str, list] = {"lr": [1e-3, 3e-3], "min_steps": [None, 100]}
SELECT = ("composed", "vote")
# Options that change only how Δw is trained: grid points that differ in these share w0 and the prefix features.
_TRAINING_ONLY = {"lr", "min_steps", "epochs", "optimizer", "schedule", "warmup", "step_epochs", "step_gamma",
                  "penalty", "radius", "loss", "kappa", "rsl_m", "batch_size", "eval_batch_size", "threads"}


def _val_scores(trainer: ShardTrainer, models, sizes: list[float]) -> dict[str, float]:
    """Validation accuracy of the composition and of the majority vote of the shard models."""
    cache, labels = trainer.val_features, trainer.val_labels
    composed = trainer.logits([weighted_average([m.delta for m in models], sizes)], cache)[0]
    per = trainer.logits([m.delta for m in models], cache)  # (K, N, C)
    return {"composed": accuracy(composed, labels), "vote": accuracy(vote_counts(per), labels)}


def search_store(cfg: TrainConfig, num_shards: int, grid: dict[str, list] | None = None, *,
                 select: str = "composed", store: str | Path | None = None, backend: str = "batched",
                 chunk: int | None = None, output: str | Path | None = None, progress: bool = True,
                 base: ShardTrainer | None = None) -> dict[str, Any]:
    """Select ``grid`` (default :data:`DEFAULT_STORE_GRID`) for a K-shard store of ``cfg`` on validation.

    Cost: one batched training of K shards per grid point (the prefix features once per w0). ``base``: a trainer
    of ``cfg`` already built (its w0 and features are reused)."""
    check_shard_config(cfg)
    if select not in SELECT:
        raise ConfigError(f"--select {select}: use composed (TAFT, Model Soup) or vote (SISA)")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"--shards {num_shards}: must be an integer >= 1")
    grid = dict(grid) if grid else dict(DEFAULT_STORE_GRID)
    points = grid_points(grid)
    for setting in points:
        dataclasses.replace(cfg, **setting)  # a bad value is refused before anything trains
    base = base or ShardTrainer.from_config(cfg, progress=progress)
    if base.val_features is None or not len(base.val_features):
        raise ConfigError(f"shards search: {cfg.data} has no validation split to select on")
    jobs = shard_jobs(list(base.features.ids), num_shards, cfg.seed)
    sizes = [float(len(ids)) for _, ids in jobs]
    candidates = []
    for setting in points:
        c = dataclasses.replace(cfg, **setting)
        if set(setting) <= _TRAINING_ONLY:
            trainer = ShardTrainer(c, base.clf, base.features, base.labels, val_features=base.val_features,
                                   val_labels=base.val_labels)
        else:  # another w0 or another prefix: its own features
            trainer = ShardTrainer.from_config(c, progress=progress)
        trainer.validate_shards = False
        t0 = time.perf_counter()
        try:
            models = trainer.train_batched(jobs, chunk=chunk)
            scores = _val_scores(trainer, models, sizes)
        except TrainingDiverged as e:  # a diverged point is recorded and never chosen
            scores = {"composed": math.nan, "vote": math.nan, "diverged": str(e)}
        candidates.append({"setting": setting, "val_composed": scores["composed"], "val_vote": scores["vote"],
                           "train_s": time.perf_counter() - t0, **({"diverged": scores["diverged"]}
                                                                   if "diverged" in scores else {})})
        if progress:
            print(f"  {setting}: validation composed {scores['composed']:.4f}, vote {scores['vote']:.4f}", flush=True)
    ok = [i for i, c in enumerate(candidates) if math.isfinite(c[f"val_{select}"])]
    if not ok:
        raise ConfigError("shards search: every grid point diverged; lower the learning rates in --grid")
    best = max(ok, key=lambda i: (candidates[i][f"val_{select}"], -i))
    chosen = points[best]
    out: dict[str, Any] = {"method": cfg.method, "shards": num_shards, "grid": grid, "select": select,
                           "selected_on": "val", "chosen": chosen, "val": candidates[best][f"val_{select}"],
                           "candidates": candidates, "config": dataclasses.asdict(dataclasses.replace(cfg, **chosen)),
                           "note": "validation examples are not training examples of the store, so they are not "
                                   "subject to removal; the test split was not read"}
    if store is not None:
        out["store"] = train_store(dataclasses.replace(cfg, **chosen), store, num_shards, backend=backend,
                                   chunk=chunk, progress=progress)
    if output is not None:
        write_json(Path(output), out)
    return out
