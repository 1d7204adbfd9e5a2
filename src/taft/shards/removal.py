"""``taft shards forget``: exact removal of training examples — their shards dropped or retrained on what they
have left, their features rewritten without them, the composition redone."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from taft.config import ConfigError
from taft.shards.common import (
    Loaded,
    _read_features,
    _register_features,
    _store_config,
    _trainer_for,
    _withdraw_composed,
    _write_shard_features,
)
from taft.shards.composition import _begin, _compose, _remove_composed
from taft.shards.create import _train_jobs
from taft.shards.store import ShardStore, StoreError


def forget(store_dir: str | Path, ids: Sequence[str], *, retrain: bool = False, backend: str = "sequential",
           progress: bool = False, loaded: Loaded | None = None) -> dict:
    """Forget training examples ``ids``: their shards are dropped from the composition, or (``retrain``) trained
    again from w0 on their remaining examples; their shards' features files lose the forgotten rows; superseded
    shard files are deleted; the composition is redone. Nothing derived from a forgotten example remains in the
    store. ``loaded``: what a long-lived process keeps in memory between requests (:class:`ShardSession`)."""
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ConfigError("no ids to forget; pass --ids ID ... or --ids-file FILE (one id per line)")
    # the audit log keeps how many ids were asked for, never the ids (see ShardStore.tombstone)
    with ShardStore(store_dir) as store, store.writing("forget", {"ids": len(ids), "retrain": retrain}):
        _begin(store, loaded)
        wanted = set(ids)
        rows = [r for r in store.db.execute("SELECT id, shard, forgotten_in FROM examples WHERE forgotten_in IS NULL")
                if r[0] in wanted]
        known = {i: f for i, _, f in rows}
        stones = {store.tombstone(i): i for i in ids if i not in known}
        for t, f in store.db.execute("SELECT id, forgotten_in FROM examples WHERE forgotten_in IS NOT NULL"):
            if t in stones:
                known[stones[t]] = f
        unknown = [i for i in ids if i not in known]
        hidden = [r["shard"] for r in store.shard_rows() if r["status"] == "live" and r["shard"] in
                  set(store.undisclosed())]
        if unknown:
            maybe = (f" They may be in imported shard(s) {hidden}, whose ids were not disclosed: such a shard can only "
                     f"be dropped as a whole (`taft shards drop --store {store.root} --shard K`)" if hidden else "")
            raise StoreError(f"{len(unknown)} id(s) are not training examples of this store (e.g. {unknown[:3]}); "
                             f"nothing was forgotten. `taft shards status --ids` lists the store's ids and shards."
                             + maybe)
        already = [i for i in ids if known[i] is not None]
        todo = [i for i in ids if known[i] is None]
        if not todo:
            raise StoreError(f"all {len(ids)} id(s) were already forgotten (request(s) "
                             f"{sorted({known[i] for i in ids})}); nothing to do")
        live_count = store.db.execute("SELECT COUNT(*) FROM examples WHERE forgotten_in IS NULL").fetchone()[0]
        if len(todo) == live_count:
            raise StoreError("this request forgets every remaining training example: no model would be left. "
                             "Delete the store folder instead")
        gone = set(todo)
        affected = sorted({k for i, k, _ in rows if i in gone})
        remaining = {k: [i for i in store.live_ids(k) if i not in gone] for k in affected}
        # 1. the affected shards' features without the forgotten rows, as new files (an imported shard has none:
        # it was trained elsewhere, so it is dropped, never retrained)
        imported = set(store.imported())
        own = [k for k in affected if k not in imported]
        t_start = time.perf_counter()
        old_feats = {k: r for k, r in store.feature_rows().items() if k in own}
        feats = _read_features(store, own, loaded)
        written = _write_shard_features(store, feats, {k: remaining[k] for k in own if remaining[k]}, old_feats)
        # 2. one transaction: forgotten, shards emptied/dropped/awaiting retrain, old files to delete
        rows = {r["shard"]: r for r in store.shard_rows()}
        old_files = [store.root / rows[k]["file"] for k in affected if rows[k]["file"]]
        old_files += [store.root / r["file"] for r in old_feats.values()]
        status = {k: "empty" if not remaining[k] else ("untrained" if retrain and k not in imported else "dropped")
                  for k in affected}
        _withdraw_composed(store)  # from here until the new composition, readers of composed/ are refused
        with store.transaction() as db:
            stone = {i: store.tombstone(i) for i in todo}  # the id and label go; a keyed digest stays
            db.executemany("UPDATE examples SET forgotten_in = ?, id = ?, label = -1 WHERE id = ?",
                           [(store.request, stone[i], i) for i in todo])
            for k in affected:
                db.execute("UPDATE shards SET status = ?, file = NULL, sha256 = NULL, examples = ?, "
                           "ids_sha256 = NULL WHERE shard = ?", (status[k], len(remaining[k]), k))
            db.executemany("DELETE FROM features WHERE shard = ?", [(k,) for k in affected if not remaining[k]])
            db.executemany("INSERT OR IGNORE INTO pending (path) VALUES (?)", [(store.rel(p),) for p in old_files])
            _register_features(store, db, written)
            store.set_meta(db, "dirty", True)
            store.record(db, "forgotten", {"ids": [stone[i] for i in todo], "shards": affected})
        store.delete_files(old_files)
        kept = feats.subset([i for k in own for i in remaining[k]])
        if loaded is not None:
            loaded.keep_features(store, {k: feats.subset(remaining[k]) for k in written})
        features_s = time.perf_counter() - t_start
        # 3. retrain the affected shards on what they have left
        t0 = time.perf_counter()
        jobs = [(k, remaining[k]) for k in own if remaining[k]] if retrain else []
        if jobs:
            trainer = _trainer_for(store, _store_config(store), progress, features=kept, loaded=loaded)
            _train_jobs(store, trainer, jobs, backend, progress=progress, loaded=loaded)
        retrain_s = time.perf_counter() - t0
        # 4. the composition of what is live now
        live_rows = [r for r in store.shard_rows() if r["status"] == "live"]
        composed = _compose(store, loaded=loaded) if live_rows else _remove_composed(store)
        out = {"forgotten": todo, "already_forgotten": already, "shards": affected,
               "action": "retrained" if retrain else "dropped", "empty_shards": [k for k in affected
                                                                                 if not remaining[k]],
               "retrain_s": retrain_s, "composed": composed,
               "imported_dropped": [k for k in affected if k in imported and remaining[k]],
               "may_remain_in": hidden,
               "timing_s": {"features": features_s, "retrain": retrain_s,
                            "compose": time.perf_counter() - t0 - retrain_s}}
        with store.transaction() as db:  # counts only: the log keeps no forgotten id
            store.finish(db, {**out, "forgotten": len(todo), "already_forgotten": len(already)})
        return out
