"""Shard-parallel training, composition and exact unlearning over a crash-safe shard store.

>>> from taft.shards import store_config, train_store, compose, forget, verify   # doctest: +SKIP
>>> train_store(store_config(data="trec"), "store/", 10, backend="batched")   # doctest: +SKIP
>>> forget("store/", ["3f2a…"], retrain=True)                      # doctest: +SKIP
"""

from taft.config import store_config
from taft.shards.composition import compose
from taft.shards.create import train_store
from taft.shards.removal import forget
from taft.shards.report import evaluate_store, status
from taft.shards.session import ShardSession
from taft.shards.store import ShardStore, StoreError
from taft.shards.training import ShardTrainer
from taft.shards.verification import verify

__all__ = ["ShardSession", "ShardStore", "ShardTrainer", "StoreError", "compose", "evaluate_store", "forget", "status",
           "store_config", "train_store", "verify"]
