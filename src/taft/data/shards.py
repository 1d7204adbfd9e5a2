"""Deterministic, hash-based sharding of a dataset by example id.

Shards train the components of a composed tangent model. An example's shard is ``sha256(f"{seed}:{id}")``
mod ``num_shards``, a function of its own id only, so adding or removing other examples (a deduplication, a
"forget these examples" request) never moves the rest: only the shards that actually changed need retraining.
The price is that shard sizes are balanced only in expectation, and a tiny dataset may leave a shard empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from taft.data.examples import DataError, S


def _check_num_shards(num_shards: int) -> None:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(f"num_shards must be an integer >= 1, got {num_shards!r}")


def shard_of(example_id: str, num_shards: int, seed: int) -> int:
    """The shard (in ``range(num_shards)``) of one example id."""
    _check_num_shards(num_shards)
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def assign_shards(ids: Sequence[str], num_shards: int, seed: int) -> list[int]:
    """Shard index of every id, in order (see the module docstring for why it is per-id hashing)."""
    _check_num_shards(num_shards)
    return [shard_of(id_, num_shards, seed) for id_ in ids]


def shard_jobs(ids: Sequence[str], num_shards: int, seed: int) -> list[tuple[int, list[str]]]:
    """The non-empty shards of ``ids`` with their ids in order, ``[(shard, ids)]`` sorted by shard: a store's split."""
    groups: dict[int, list[str]] = {}
    for i, s in zip(ids, assign_shards(ids, num_shards, seed), strict=True):
        groups.setdefault(s, []).append(i)
    return sorted(groups.items())


def split_into_shards(dataset: S, num_shards: int, seed: int) -> list[S]:
    """``num_shards`` disjoint subsets covering ``dataset``; each keeps the dataset's order.

    Works for any dataset with ``ids`` and ``subset`` (:class:`~taft.data.examples.TextDataset`, the image
    datasets of :mod:`taft.data.images`).
    """
    shards = assign_shards(dataset.ids, num_shards, seed)
    positions: list[list[int]] = [[] for _ in range(num_shards)]
    for position, shard in enumerate(shards):
        positions[shard].append(position)
    return [dataset.subset(p) for p in positions]
