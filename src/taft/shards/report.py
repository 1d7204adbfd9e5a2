"""``taft shards status`` and ``taft shards eval``: what a store holds, and the accuracy of its composed model, its
shards' ensemble and SISA's vote on a held-out split."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from taft.config import ConfigError
from taft.shards.common import _store_config, check_data, check_readable, load_shard, unfinished
from taft.shards.composition import privacy_guarantee, read_composed
from taft.shards.store import ShardStore
from taft.shards.training import ShardTrainer, accuracy, vote_counts
from taft.train.cache import FeatureCache

EVAL_SPLITS = ("val", "test")  # held-out splits: a store's training split is never reported as accuracy


def status(store_dir: str | Path) -> dict[str, Any]:
    """The store's shards (status, size, generation, validation accuracy), its composition and its history."""
    with ShardStore(store_dir) as store:
        return {"store": str(store.root), "config": store.get_meta("config"),
                "num_shards": store.get_meta("num_shards"), "shards": store.shard_rows(),
                "examples": store.db.execute("SELECT COUNT(*) FROM examples").fetchone()[0],
                "forgotten": len(store.forgotten_ids()), "composed": store.get_meta("composed"),
                "dirty": store.get_meta("dirty", False), "unfinished": unfinished(store),
                "origins": store.origins(), "undisclosed": store.undisclosed(),
                "data_sources": store.get_meta("data_sources"), "privacy": _privacy_state(store),
                "ids": [{"id": i, "shard": k, "forgotten_in": f} for i, k, f in store.db.execute(
                    "SELECT id, shard, forgotten_in FROM examples ORDER BY position")],
                "history": [{k: a[k] for k in ("seq", "request", "time", "action", "outcome")} for a in
                            store.audit_rows()]}


def _privacy_state(store: ShardStore) -> dict[str, Any] | None:
    """The live shards' privacy: None when none is private, else the guarantee of their composition (or why it
    has none: a shard without a privacy record)."""
    rows = [r for r in store.shard_rows() if r["status"] == "live"]
    if store.get_meta("config") is None or not rows:
        return None
    if not any(r["privacy"] for r in rows) and _store_config(store).dp_epsilon is None:
        return None
    return privacy_guarantee(store, rows)


@torch.no_grad()
def shard_logits(store_dir: str | Path, split: str = "test", *, which: str = "shards",
                 max_eval: int | None = None) -> tuple[Tensor, Tensor, list[int]]:
    """Logits of every live shard model (``which="shards"``: (K, N, C)) or of the composed model ((1, N, C)) on a
    held-out split (val | test) of the store's data, with the labels and the shard indices — what ensembles and
    SISA's vote use. A store with an unfinished request is refused (:func:`check_readable`)."""
    if split not in EVAL_SPLITS:
        hint = (" (training accuracy of a store is not a held-out number; its shards' validation accuracy is in "
                "`taft shards status`)" if split == "train" else "")
        raise ConfigError(f"--split {split}: use val or test{hint}")
    with ShardStore(store_dir) as store:
        check_readable(store)
        cfg = _store_config(store)
        if max_eval is not None:
            cfg = dataclasses.replace(cfg, max_eval=max_eval)
        trainer = ShardTrainer.from_config(cfg, features=FeatureCache([], ids=[]), labels={})
        check_data(store, trainer, [split])
        ds = getattr(trainer.prep.splits, split)
        if ds is None:
            raise ConfigError(f"{cfg.data} has no {split} split")
        ds = ds.subset(range(min(len(ds), cfg.max_eval or len(ds))))
        cache = trainer.prep.cache_for(trainer.template, ds, split, False, None, "")
        if which == "composed":
            deltas, shards = [read_composed(store)], [-1]
        else:
            rows = [r for r in store.shard_rows() if r["status"] == "live"]
            deltas, shards = [load_shard(store, r)[0] for r in rows], [r["shard"] for r in rows]
        return trainer.logits(deltas, cache), ds.labels, shards


def evaluate_store(store_dir: str | Path, split: str = "test", *, max_eval: int | None = None) -> dict[str, Any]:
    """Accuracy of the composed model, of the shard models' outputs averaged with the composition's weights (the
    ensemble it equals for TAFT; excluded shards weigh 0), and of SISA's majority vote of the live shard models."""
    per_shard, labels, shards = shard_logits(store_dir, split, max_eval=max_eval)
    composed, _, _ = shard_logits(store_dir, split, which="composed", max_eval=max_eval)
    with ShardStore(store_dir) as store:
        info = store.get_meta("composed") or {}
    weight = dict(zip(info.get("shards", []), info.get("weights", []), strict=True))
    w = torch.tensor([weight.get(k, 0.0) for k in shards], dtype=per_shard.dtype)  # the composition's weights
    ensemble = (w[:, None, None] * per_shard).sum(0) if w.sum() > 0 else per_shard.mean(0)
    return {"split": split, "examples": len(labels), "shards": shards, "composed": accuracy(composed[0], labels),
            "ensemble_mean": accuracy(ensemble, labels), "vote": accuracy(vote_counts(per_shard), labels),
            "per_shard": [accuracy(p, labels) for p in per_shard]}
