"""A shard store held open by a long-lived process, so that forgetting costs about one shard's retraining.

A one-shot ``taft shards forget`` pays a fixed cost before and after the shard's retraining: start-up, loading w0,
the validation features, reading every live shard's Δw (and hashing it) to recompose. A service that takes deletion
requests keeps all of that in memory with :class:`ShardSession`; each request then reads only what changed.

Nothing in memory is trusted blindly: shard Δw and features files are kept by ``(file, SHA-256)`` and used only
while the manifest still lists that file with that hash, so a change made by another process (another session, or
the CLI) is read from disk again. Every request is the same locked, audited, crash-safe request as the CLI's, and
its result is bitwise the same (``tests/shards/test_session.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taft.shards.common import Loaded, _store_config, _trainer_for, load_shard
from taft.shards.composition import compose
from taft.shards.grow import add_data, import_shard
from taft.shards.removal import forget
from taft.shards.store import ShardStore


class ShardSession:
    """Open ``store_dir`` for a long-lived process; ``warm`` loads w0, the features and every live shard now.

    >>> session = ShardSession("stores/trec")              # doctest: +SKIP
    >>> session.add("new-examples.txt")                     # doctest: +SKIP
    >>> session.forget(["3f2a…"], retrain=True)            # doctest: +SKIP
    """

    def __init__(self, store_dir: str | Path, *, progress: bool = False, warm: bool = True) -> None:
        self.root = Path(store_dir).expanduser()
        self.progress = progress
        self.loaded = Loaded()
        with ShardStore(self.root):  # a missing or foreign store is refused here, not at the first request
            pass
        if warm:
            self.warm()

    def warm(self) -> None:
        """Load w0 and the validation features, every shard's features and every live shard's Δw (each checked
        against the manifest's hashes)."""
        with ShardStore(self.root) as store:
            if store.get_meta("config") is None:
                return  # an interrupted creation: the first request reports it
            # w0, the validation features and every shard's features (none yet in a store of the old one-file
            # layout: its next request splits it)
            _trainer_for(store, _store_config(store), self.progress, loaded=self.loaded, write=False)
            for row in store.shard_rows():
                if row["status"] == "live":
                    load_shard(store, row, self.loaded)

    def forget(self, ids: Sequence[str], *, retrain: bool = False) -> dict[str, Any]:
        """:func:`taft.shards.forget` with what this process has loaded."""
        try:
            return forget(self.root, ids, retrain=retrain, progress=self.progress, loaded=self.loaded)
        finally:
            self._prune()

    def add(self, data: str | Path, *, num_shards: int | None = None, backend: str = "sequential",
            strict: bool = False) -> dict[str, Any]:
        """:func:`taft.shards.grow.add_data` with w0 and the validation features in memory; the new shards' Δw and
        features are kept."""
        try:
            return add_data(self.root, data, num_shards=num_shards, backend=backend, strict=strict,
                            progress=self.progress, loaded=self.loaded)
        finally:
            self._prune()

    def import_shard(self, package: str | Path) -> dict[str, Any]:
        """:func:`taft.shards.grow.import_shard`, recomposing from the shards in memory."""
        try:
            return import_shard(self.root, package, loaded=self.loaded)
        finally:
            self._prune()

    def compose(self, *, weights: str | None = None, exclude: Sequence[int] | None = None) -> dict[str, Any]:
        """:func:`taft.shards.compose` from the shards in memory."""
        try:
            return compose(self.root, weights=weights, exclude=exclude, loaded=self.loaded)
        finally:
            self._prune()

    def _prune(self) -> None:
        with ShardStore(self.root) as store:
            self.loaded.prune(store)
