"""What ``taft shards`` does: train a store, compose it, forget examples, verify and report it.

Every request takes the store folder, holds the writer lock for the whole request and appends to the audit log
(:mod:`taft.shards.store`). Each lives in its own module; this one only re-exports them, so
``from taft.shards.ops import X`` keeps working:

- :mod:`taft.shards.common` — what several requests share: :class:`Loaded`, :func:`ids_digest`,
  :func:`check_data`, the store's settings, the per-shard features files, :func:`load_shard`, the trainer over a
  store, and :func:`unfinished` / :func:`check_readable` (a reader refuses a store whose last change is unfinished);
- :mod:`taft.shards.composition` — :func:`compose`, :func:`privacy_guarantee`, :func:`read_composed`, and ``_begin``
  (what every writing request does first: finish an interrupted writer);
- :mod:`taft.shards.create` — :func:`train_store`, :func:`check_num_shards` and the training backends
  (:data:`BACKENDS`: sequential, batched, Ray);
- :mod:`taft.shards.removal` — :func:`forget`;
- :mod:`taft.shards.verification` — :func:`verify`;
- :mod:`taft.shards.report` — :func:`status`, :func:`shard_logits`, :func:`evaluate_store`.

The modules import one way: common ← composition ← create ← removal; verification and report over composition.
The modules are named for their request (composition, removal, verification) so that none shadows the function
of the same request (``from taft.shards import forget`` is the function).
"""

from taft.shards.common import (
    Loaded,
    _read_features,
    _trainer_for,
    check_data,
    check_readable,
    ids_digest,
    load_shard,
    unfinished,
)
from taft.shards.composition import WEIGHTS, compose, privacy_guarantee, read_composed
from taft.shards.create import BACKENDS, MAX_SHARDS, check_num_shards, train_store
from taft.shards.removal import forget
from taft.shards.report import EVAL_SPLITS, evaluate_store, shard_logits, status
from taft.shards.store import ShardStore, StoreError
from taft.shards.training import check_backend
from taft.shards.verification import verify

__all__ = ["BACKENDS", "EVAL_SPLITS", "MAX_SHARDS", "WEIGHTS", "Loaded", "ShardStore", "StoreError", "_read_features",
           "_trainer_for", "check_backend", "check_data", "check_num_shards", "check_readable", "compose",
           "evaluate_store", "forget", "ids_digest", "load_shard", "privacy_guarantee", "read_composed",
           "shard_logits", "status", "train_store", "unfinished", "verify"]
