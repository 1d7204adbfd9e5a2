"""Shard-parallel training, composition and exact unlearning over a crash-safe shard store.

>>> from taft.shards import train_store, compose, forget, verify   # doctest: +SKIP
>>> train_store(cfg, "store/", 10, backend="batched")            # doctest: +SKIP
>>> forget("store/", ["3f2a…"], retrain=True)                      # doctest: +SKIP
"""

from taft.shards.composition import compose
from taft.shards.create import train_store
from taft.shards.removal import forget
from taft.shards.report import evaluate_store, status
from taft.shards.session import ShardSession
from taft.shards.store import ShardStore, StoreError
from taft.shards.training import ShardTrainer
from taft.shards.verification import verify

__all__ = ["ShardSession", "ShardStore", "ShardTrainer", "StoreError", "compose", "evaluate_store", "forget", "status",
           "train_store", "verify"]
