"""What several ``taft shards`` requests share: the store's settings and data check, the per-shard features files,
reading a shard's Δw, the trainer over a store, and the checks a reader makes on an unfinished store.

The requests themselves live in :mod:`taft.shards.composition` (compose), :mod:`taft.shards.create` (train),
:mod:`taft.shards.removal`, :mod:`taft.shards.verification` and :mod:`taft.shards.report` (status, evaluate);
:mod:`taft.shards.ops` re-exports them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import Timeout
from torch import Tensor

from taft.checkpoint import CheckpointError, fingerprints, read_delta
from taft.config import TrainConfig, from_dict
from taft.data.examples import check_digests
from taft.shards.store import ShardStore, StoreError, atomic_tmp, publish
from taft.shards.training import ShardTrainer
from taft.train.cache import FeatureCache
from taft.train.rundir import sha256_file, withdraw

# options that change what a shard computes: a store keeps the ones it was created with
_RUN_ONLY = ("output_dir", "overwrite", "cache", "cache_dir", "threads", "device", "eval_batch_size", "max_eval")


@dataclasses.dataclass
class Loaded:
    """What a long-lived process keeps between requests on one store (:class:`taft.shards.ShardSession`): the
    trainer (w0 and the validation features), and shard Δw and features files by ``(file, SHA-256)``. An entry is
    used only while the manifest still lists that file with that hash, so a change made by another process is read
    from disk again; nothing is trusted that the manifest does not name."""

    trainer: ShardTrainer | None = None
    meta: dict[str, str] | None = None  # the shard files' metadata (w0's fingerprints: hashing w0 once)
    deltas: dict[tuple[str, str], tuple[dict[str, Tensor], dict[str, str]]] = dataclasses.field(default_factory=dict)
    features: dict[tuple[str, str], FeatureCache] = dataclasses.field(default_factory=dict)

    def keep_features(self, store: ShardStore, caches: dict[int, FeatureCache]) -> None:
        rows = store.feature_rows()
        for k, cache in caches.items():
            self.features[(rows[k]["file"], rows[k]["sha256"])] = cache

    def prune(self, store: ShardStore) -> None:
        """Forget entries the manifest no longer lists (superseded shards and features)."""
        shards = {(r["file"], r["sha256"]) for r in store.shard_rows() if r["file"]}
        feats = {(r["file"], r["sha256"]) for r in store.feature_rows().values()}
        self.deltas = {k: v for k, v in self.deltas.items() if k in shards}
        self.features = {k: v for k, v in self.features.items() if k in feats}


def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of a training set (its ids in order): recorded with each shard file, checked by ``verify``."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def check_data(store: ShardStore, trainer: ShardTrainer, splits: Sequence[str]) -> None:
    """The store's data, read again (validation, test), must be the data it was made with (content hashes)."""
    check_digests(store.get_meta("data_digest"), trainer.prep.splits, splits, what=f"the store {store.root}",
                  spec=trainer.cfg.data, extra=trainer.prep.data_fingerprint)


def _store_config(store: ShardStore) -> TrainConfig:
    return from_dict(TrainConfig, store.get_meta("config"))


def _same_setting(a: TrainConfig, b: TrainConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [k for k in da if k not in _RUN_ONLY and da[k] != db[k]]


# -- features: one file per shard, so a forget rewrites only its shards' rows -----------------------------------
def _write_shard_features(store: ShardStore, features: FeatureCache, ids_of: dict[int, Sequence[str]],
                          old: dict[int, dict[str, Any]]) -> dict[int, tuple[Path, str, int]]:
    """Write each shard's rows of ``features`` (``ids_of``: shard -> its live ids) to a new file of the next
    generation after ``old``'s; returns ``{shard: (path, sha256, generation)}``. The caller registers them."""
    gens = {k: (old[k]["generation"] + 1 if k in old else 1) for k in ids_of}
    paths = {k: store.feature_file(k, gens[k]) for k in ids_of}
    store.add_pending(*paths.values(), *(atomic_tmp(p) for p in paths.values()))
    out = {}
    for k, ids in ids_of.items():
        tmp = atomic_tmp(paths[k])
        features.subset(list(ids)).save(tmp)
        publish(tmp, paths[k])
        out[k] = (paths[k], sha256_file(paths[k]), gens[k])
    return out


def _live_shard(store: ShardStore, db, shard: int, path: Path, sha: str, *, examples: int, ids_sha256: str,
                generation: int, privacy: dict | None, val_acc: float | None, train_s: float | None) -> None:
    """Inside the caller's transaction: shard ``shard`` is live with the file ``path`` (written, settled here) and
    its ``shard`` audit row, the one ``verify`` and the privacy history read. Every column of the row is written, so
    a shard that awaited training (``train``, a forget's retrain) and a new one (``add``, ``import``) end alike."""
    db.execute("INSERT OR REPLACE INTO shards (shard, status, file, sha256, examples, generation, val_acc, train_s, "
               "trained_in, ids_sha256, privacy) VALUES (?, 'live', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (shard, store.rel(path), sha, examples, generation, val_acc, train_s, store.request, ids_sha256,
                json.dumps(privacy) if privacy else None))
    store.settle(db, path, atomic_tmp(path))
    store.record(db, "shard", {"shard": shard, "file": store.rel(path), "sha256": sha, "examples": examples,
                               "generation": generation, "privacy": privacy})


def _register_features(store: ShardStore, db, written: dict[int, tuple[Path, str, int]]) -> None:
    """Inside a transaction: the written features files are now the shards' own."""
    db.executemany("INSERT OR REPLACE INTO features (shard, file, sha256, generation) VALUES (?, ?, ?, ?)",
                   [(k, store.rel(p), sha, g) for k, (p, sha, g) in written.items()])
    for p, _, _ in written.values():
        store.settle(db, p, atomic_tmp(p))


def _read_features(store: ShardStore, shards: Sequence[int] | None = None,
                   loaded: Loaded | None = None) -> FeatureCache:
    """The features of ``shards`` (default: every shard with live examples), each file checked against its SHA-256,
    its shard's live ids and the store's feature setting (``loaded``: files already read are taken from memory)."""
    rows = store.feature_rows()
    parts = []
    for k in shards if shards is not None else list(rows):
        row = rows.get(k)
        path = store.root / row["file"] if row else None
        key = (row["file"], row["sha256"]) if row else None
        if loaded is not None and key in loaded.features and loaded.features[key].ids == store.live_ids(k):
            parts.append(loaded.features[key])
            continue
        try:
            if row is None:
                raise StoreError("the manifest lists no features file for it")
            if sha256_file(path) != row["sha256"]:
                raise StoreError("the file does not match the SHA-256 in the manifest (corrupt or replaced)")
            parts.append(FeatureCache.load(path, expect_ids=store.live_ids(k),
                                           expect_info=store.get_meta("features_info")))
            if loaded is not None:
                loaded.features[key] = parts[-1]
        except Exception as e:
            raise StoreError(f"shard {k}: its training features ({row['file'] if row else 'none'}) cannot be read "
                             f"or do not match the manifest ({e}); run `taft shards verify`") from e
    return FeatureCache.concat(parts)


# -- validation features: written once (validation examples are never training examples, so never forgotten) ----
VAL_FEATURES = "features/val.safetensors"


def _read_val_features(store: ShardStore) -> FeatureCache | None:
    """The validation features the store kept, if its manifest lists them and the file matches its SHA-256 and the
    store's feature setting; else None (a store made before they were kept, or a damaged file: the caller encodes
    the validation split again, and ``verify`` reports the damage)."""
    rec = store.get_meta("val_features")
    if not rec:
        return None
    path = store.root / rec["file"]
    try:
        if sha256_file(path) != rec["sha256"]:
            return None
        return FeatureCache.load(path, expect_info=store.get_meta("features_info"))
    except Exception:
        return None


def _write_val_features(store: ShardStore, trainer: ShardTrainer) -> tuple[Path, dict[str, Any]] | None:
    """Write the trainer's validation features to the store's folder (pending until :func:`_register_val_features`
    commits them); None when there is no validation split."""
    if trainer.val_features is None or trainer.val_features.ids is None:
        return None
    path = store.root / VAL_FEATURES
    store.add_pending(path, atomic_tmp(path))
    tmp = atomic_tmp(path)
    trainer.val_features.save(tmp)
    publish(tmp, path)
    return path, {"file": VAL_FEATURES, "sha256": sha256_file(path), "examples": len(trainer.val_features)}


def _register_val_features(store: ShardStore, db, written: tuple[Path, dict[str, Any]] | None) -> None:
    """Inside a transaction: the written validation features are now the store's."""
    if written is None:
        return
    path, rec = written
    store.set_meta(db, "val_features", rec)
    store.settle(db, path, atomic_tmp(path))
    store.record(db, "features", {"validation": rec})


def _upgrade_features(store: ShardStore) -> None:
    """A store made before features were kept per shard (one ``features/train-gN`` file for all): split it into one
    file per shard, crash-safely (the old file stays the store's until one transaction switches over)."""
    old = store.get_meta("features")
    if not old:
        return
    path = store.root / old
    try:
        feats = FeatureCache.load(path, expect_ids=store.all_live_ids(), expect_info=store.get_meta("features_info"))
    except Exception as e:
        raise StoreError(f"{old}: the store's training features cannot be read or do not match the manifest ({e}); "
                         f"run `taft shards verify`") from e
    rows = store.shard_rows()
    written = _write_shard_features(store, feats, {r["shard"]: ids for r in rows
                                                   if (ids := store.live_ids(r["shard"]))}, {})
    with store.transaction() as db:
        _register_features(store, db, written)
        store.set_meta(db, "features", None)
        db.execute("INSERT OR IGNORE INTO pending (path) VALUES (?)", (old,))
        store.record(db, "features", {"upgraded": old, "files": len(written)})
    store.delete_files([path])


def _trainer_for(store: ShardStore, cfg: TrainConfig, progress: bool, features: FeatureCache | None = None,
                 loaded: Loaded | None = None, write: bool = True) -> ShardTrainer:
    """A trainer over the store's own features (no forgotten row; ``features``: those features, already read and
    checked by the caller), after checking w0 is the store's. The validation features are the store's own when it
    kept them; ``write`` (a writing request): features encoded here become the store's. ``loaded``: w0 and the
    validation features built once per process."""
    feats = features if features is not None else _read_features(store, loaded=loaded)
    labels = dict(store.db.execute("SELECT id, label FROM examples WHERE forgotten_in IS NULL").fetchall())
    if loaded is not None and loaded.trainer is not None:
        t = loaded.trainer
        return ShardTrainer(cfg, t.clf, feats, labels, val_features=t.val_features, val_labels=t.val_labels)
    kept = _read_val_features(store)
    trainer = ShardTrainer.from_config(cfg, progress=progress, features=feats, labels=labels, val_features=kept)
    check_data(store, trainer, ["val"])
    if fingerprints(trainer.template)["all"] != store.get_meta("base_fingerprint"):
        raise StoreError(f"the model {cfg.model!r} loaded here differs from the one the store {store.root} was "
                         f"trained from (w0 fingerprint); load the same weights")
    if write and trainer.val_features is not None and trainer.val_features is not kept:
        written = _write_val_features(store, trainer)  # encoded here: kept for the next request (a store made
        with store.transaction() as db:               # before they were kept, or whose file was damaged)
            _register_val_features(store, db, written)
    if loaded is not None:
        loaded.trainer = trainer
    return trainer


_RETRAIN_HINT = ("`taft shards train --store STORE --shards K` with the options the store was made with (`taft shards "
                 "status --json` shows them) trains it again and recomposes")


def load_shard(store: ShardStore, row: dict[str, Any],
               loaded: Loaded | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A live shard's Δw, after checking its file against the manifest's SHA-256 and the store's w0 (``loaded``:
    a file already read with that hash is taken from memory)."""
    if loaded is not None and (row["file"], row["sha256"]) in loaded.deltas:
        return loaded.deltas[(row["file"], row["sha256"])]
    path = store.root / row["file"]
    if not path.is_file():
        raise StoreError(f"shard {row['shard']}: its file {row['file']} is missing; {_RETRAIN_HINT}")
    if sha256_file(path) != row["sha256"]:
        raise StoreError(f"shard {row['shard']}: {row['file']} does not match the SHA-256 in the manifest (corrupt "
                         f"or replaced); {_RETRAIN_HINT}")
    try:
        delta, meta = read_delta(path)
    except CheckpointError as e:
        raise StoreError(f"shard {row['shard']}: {e}") from e
    if meta.get("base_fingerprint") != store.get_meta("base_fingerprint"):
        raise StoreError(f"shard {row['shard']}: {row['file']} was trained on another base model")
    if loaded is not None:
        loaded.deltas[(row["file"], row["sha256"])] = (delta, meta)
    return delta, meta


def _stray_files(store: ShardStore) -> list[str]:
    known = {r["file"] for r in store.shard_rows() if r["file"]}
    known.update(r["file"] for r in store.feature_rows().values())
    if store.get_meta("features"):
        known.add(store.get_meta("features"))
    if store.get_meta("val_features"):
        known.add(store.get_meta("val_features")["file"])
    pending = {p for (p,) in store.db.execute("SELECT path FROM pending")}
    found = [store.rel(p) for d in (store.shards_dir, store.root / "features") if d.is_dir() for p in d.iterdir()]
    return sorted(f for f in found if f not in known and f not in pending)


def _unfinished(store: ShardStore) -> str:
    return (f"a forget on the store {store.root} was interrupted or is running, so this composition may still "
            f"hold forgotten examples; run `taft shards verify --store {store.root}` (it finishes an interrupted "
            f"request) and try again")


def _withdraw_composed(store: ShardStore) -> None:
    """Before a forget commits: mark the composition dirty (the next writer recomposes whatever happens) and
    withdraw ``composed/`` (every reader refuses it until the new composition replaces it)."""
    with store.transaction() as db:
        store.set_meta(db, "dirty", True)
    withdraw(store.composed_dir, _unfinished(store))


def unfinished(store: ShardStore) -> str | None:
    """Why the store cannot be read as it is (an interrupted or running writer: its composition or shard files may
    not match its manifest yet), or None."""
    pending = store.db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
    if not (store.get_meta("dirty", False) or pending):
        return None
    if not _lock_free(store):
        return (f"the store {store.root} is being changed by another taft process; wait for it to finish and try "
                f"again")
    return (f"the store {store.root} has an unfinished request (a train, compose or forget was interrupted): run "
            f"`taft shards verify --store {store.root}` to finish it, then try again")


def check_readable(store: ShardStore) -> None:
    """Refuse to read a store whose last change is unfinished (:func:`unfinished`)."""
    reason = unfinished(store)
    if reason:
        raise StoreError(reason)


def _lock_free(store: ShardStore) -> bool:
    try:
        store.lock.acquire(timeout=0)
    except Timeout:
        return False
    store.lock.release()
    return True
