"""Shard-parallel training, composition and exact unlearning over a crash-safe shard store.

>>> from taft.shards import train_store, compose, forget, verify   # doctest: +SKIP
>>> train_store(cfg, "store/", 10, backend="batched")            # doctest: +SKIP
>>> forget("store/", ["3f2a…"], retrain=True)                      # doctest: +SKIP
"""

from taft.shards.ops import compose, evaluate_store, forget, status, train_store, verify
from taft.shards.session import ShardSession
from taft.shards.store import ShardStore, StoreError
from taft.shards.training import ShardTrainer

__all__ = ["ShardSession", "ShardStore", "ShardTrainer", "StoreError", "compose", "evaluate_store", "forget", "status",
           "train_store", "verify"]
