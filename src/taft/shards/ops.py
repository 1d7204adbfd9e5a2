"""What ``taft shards`` does: train a store, compose it, forget examples, verify and report it.

Every function takes the store folder, holds the writer lock for the whole request and appends to the audit log
(:mod:`taft.shards.store`). Composition is :func:`taft.delta.weighted_average` over the live shards' Δw in shard
order; its weights are normalized to sum to 1 (``size``: each shard's number of live examples, so every example
counts the same; ``uniform``; or a JSON file ``{"shard": weight}``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import Timeout
from torch import Tensor

from taft.checkpoint import CheckpointError, delta_metadata, fingerprints, read_delta, write_delta
from taft.config import ConfigError, TrainConfig, from_dict, save_config
from taft.data.examples import check_digests, split_digests
from taft.data.shards import assign_shards, shard_jobs
from taft.delta import weighted_average
from taft.shards.store import TOMBSTONE, ShardStore, StoreError, atomic_tmp, publish
from taft.shards.training import ShardModel, ShardTrainer, check_backend, check_shard_config
from taft.train.cache import FeatureCache
from taft.train.pipeline import pin_paths
from taft.train.rundir import RunDirError, RunFolder, sha256_file, verify_run, withdraw, write_json

BACKENDS = ("sequential", "batched", "ray")
MAX_SHARDS = 100_000
EVAL_SPLITS = ("val", "test")  # held-out splits: a store's training split is never reported as accuracy
WEIGHTS = ("size", "uniform")
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


# -- writing shards -------------------------------------------------------------------------------------------
def _write_shard(path: Path, model: ShardModel, meta: dict[str, str], ids: Sequence[str]) -> str:
    """Write one shard's Δw atomically (via :func:`atomic_tmp`); returns the file's SHA-256. Idempotent: a
    retried task writes the same bytes to the same name."""
    write_delta(model.delta, meta, path, tmp=atomic_tmp(path),
                extra_metadata={"shard": model.shard, "examples": len(ids), "train_ids_sha256": ids_digest(ids)})
    return sha256_file(path)


def _register_shard(store: ShardStore, model: ShardModel, path: Path, sha: str, ids: Sequence[str],
                    generation: int) -> None:
    """The shard's file is in place: make it live in one transaction (with its audit row)."""
    if sha256_file(path) != sha:
        raise StoreError(f"{path} changed while it was registered (SHA-256 differs); run the request again")
    with store.transaction() as db:
        privacy = json.dumps(model.privacy) if model.privacy else None
        db.execute("UPDATE shards SET status = 'live', file = ?, sha256 = ?, examples = ?, generation = ?, "
                   "val_acc = ?, train_s = ?, trained_in = ?, ids_sha256 = ?, privacy = ? WHERE shard = ?",
                   (store.rel(path), sha, len(ids), generation, model.val_acc, model.train_s, store.request,
                    ids_digest(ids), privacy, model.shard))
        store.settle(db, path, atomic_tmp(path))
        store.set_meta(db, "dirty", True)  # the composition no longer matches the live shards
        store.record(db, "shard", {"shard": model.shard, "file": store.rel(path), "sha256": sha, "examples": len(ids),
                                   "generation": generation, "privacy": model.privacy})


def _train_jobs(store: ShardStore, trainer: ShardTrainer, jobs: list[tuple[int, list[str]]], backend: str,
                *, ray_address: str | None = None, chunk: int | None = None, progress: bool = False,
                loaded: Loaded | None = None) -> None:
    """Train ``jobs`` (shard, live ids) with ``backend`` and register each shard as it finishes."""
    if not jobs:
        return
    meta = (loaded.meta if loaded is not None and loaded.meta else None) or delta_metadata(trainer.template)
    if loaded is not None:
        loaded.meta = meta
    gens = {k: (store.shard_row(k)["generation"] or 0) + 1 for k, _ in jobs}
    paths = {k: store.shard_file(k, gens[k]) for k, _ in jobs}
    ids_of = dict(jobs)
    store.add_pending(*paths.values(), *(atomic_tmp(p) for p in paths.values()))
    if backend == "ray":
        for model, sha in _train_ray(trainer, jobs, paths, meta, ray_address):
            _register_shard(store, model, paths[model.shard], sha, ids_of[model.shard], gens[model.shard])
        return
    if backend == "batched":
        models = trainer.train_batched(jobs, chunk=chunk)
    else:
        from tqdm.auto import tqdm

        models = (trainer.train_one(k, ids) for k, ids in tqdm(jobs, desc="shards", disable=not progress))
    for model in models:
        sha = _write_shard(paths[model.shard], model, meta, ids_of[model.shard])
        _register_shard(store, model, paths[model.shard], sha, ids_of[model.shard], gens[model.shard])
        if loaded is not None:  # the Δw just written (the file's metadata as read_delta gives it: read once)
            loaded.deltas[(store.rel(paths[model.shard]), sha)] = (model.delta, read_delta(paths[model.shard])[1])


def _ray_task(cfg, clf, features, labels, val_features, val_labels, shard, ids, path, meta):
    trainer = ShardTrainer(cfg, clf, features, labels, val_features=val_features, val_labels=val_labels)
    model = trainer.train_one(shard, ids)
    return model, _write_shard(Path(path), model, meta, ids)


def _train_ray(trainer: ShardTrainer, jobs, paths, meta, address: str | None):
    """One Ray task per shard; w0 (the classifier) and the features are put in the object store once."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray needs Ray: pip install 'taft[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({} if address else {"num_cpus": max(1, min(os.cpu_count() or 1, len(jobs)))}))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray-address {address}: cannot connect to a Ray cluster ({e})") from e
    try:
        cfg = dataclasses.replace(trainer.cfg, device="cpu", threads=1)
        refs = [ray.put(x) for x in (cfg, trainer.clf.to("cpu"), trainer.features, trainer.labels,
                                     trainer.val_features, trainer.val_labels)]
        task = ray.remote(max_retries=2)(_ray_task)
        pending = [task.remote(*refs, k, list(ids), str(paths[k]), meta) for k, ids in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        trainer.clf.to(trainer.device)
        if started:
            ray.shutdown()


# -- train ------------------------------------------------------------------------------------------------------
def train_store(cfg: TrainConfig, store_dir: str | Path, num_shards: int, *, backend: str = "sequential",
                ray_address: str | None = None, chunk: int | None = None, progress: bool = True,
                weights: str = "size") -> dict[str, Any]:
    """Split the training set into ``num_shards`` disjoint shards (seeded per-id hash), train one Δw per shard from
    the same w0, and compose them. On an existing store (same settings), train only the shards that have no model
    yet — the way to resume an interrupted run."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    check_backend(cfg, backend)
    check_num_shards(num_shards)
    check_shard_config(cfg)
    cfg = pin_paths(cfg)  # a store reads its validation and test data again later, from any folder
    root = Path(store_dir).expanduser()
    has_db = (root / "manifest.sqlite").is_file()
    if not has_db and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreError(f"--store {root} exists and is not a shard store; choose a new folder")
    store = ShardStore(root, create=True)
    exists = store.get_meta("config") is not None  # else new, or a creation that was interrupted: start over
    try:
        if exists:
            old, k_old = pin_paths(_store_config(store)), store.get_meta("num_shards")
            diff = _same_setting(old, cfg)
            if diff or k_old != num_shards:
                what = ", ".join(f"{k}={getattr(old, k)!r}" for k in diff) or f"shards={k_old}"
                raise StoreError(f"--store {root} was made with other settings ({what}); resuming needs the same "
                                 f"options, or choose a new --store")
        args = {"shards": num_shards, "backend": backend, "config": dataclasses.asdict(cfg)}
        with store.writing("train", args):
            _begin(store)
            if not exists:
                trainer = ShardTrainer.from_config(cfg, progress=progress)
                _create(store, trainer, num_shards)
            else:
                _reclaim_lost(store)
                trainer = _trainer_for(store, cfg, progress)
            jobs = [(r["shard"], store.live_ids(r["shard"])) for r in store.shard_rows() if r["status"] == "untrained"]
            t0 = time.perf_counter()
            _train_jobs(store, trainer, jobs, backend, ray_address=ray_address, chunk=chunk, progress=progress)
            train_s = time.perf_counter() - t0
            summary = _compose(store, weights=weights, exclude=store.get_meta("exclude", []))
            with store.transaction() as db:
                store.finish(db, {"trained": [k for k, _ in jobs], "train_s": train_s})
        return {**summary, "trained": [k for k, _ in jobs], "train_s": train_s, "backend": backend}
    finally:
        store.close()


def check_num_shards(num_shards: object, examples: int | None = None) -> None:
    """K is an integer in 1..MAX_SHARDS and (once the data is known) at most the number of training examples."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ConfigError(f"--shards {num_shards}: must be an integer >= 1")
    if num_shards > MAX_SHARDS:
        raise ConfigError(f"--shards {num_shards}: at most {MAX_SHARDS} shards (each is a model file and a training "
                          f"run); choose fewer")
    if examples is not None and num_shards > examples:
        raise ConfigError(f"--shards {num_shards}: more shards than the {examples} training examples (a shard needs "
                          f"examples to train on); choose --shards {examples} or fewer")


def _reclaim_lost(store: ShardStore) -> None:
    """Resuming: a live shard whose file is missing or does not match its SHA-256 (deleted, truncated, replaced)
    is trained again, like a shard that never finished (a damaged file is deleted: it is derived data)."""
    lost = []
    imported = set(store.imported())  # (no training features here: verify reports a lost one, to import again)
    for r in store.shard_rows():
        if r["status"] != "live" or r["shard"] in imported:
            continue
        path = store.root / r["file"]
        if not path.is_file() or sha256_file(path) != r["sha256"]:
            lost.append((r, path))
    if not lost:
        return
    with store.transaction() as db:
        for r, path in lost:
            db.execute("UPDATE shards SET status = 'untrained', file = NULL, sha256 = NULL, ids_sha256 = NULL "
                       "WHERE shard = ?", (r["shard"],))
            db.execute("INSERT OR IGNORE INTO pending (path) VALUES (?)", (store.rel(path),))
        store.set_meta(db, "dirty", True)
        store.record(db, "lost", {"shards": [r["shard"] for r, _ in lost], "files": [r["file"] for r, _ in lost]})
    store.delete_files([p for _, p in lost])


def _create(store: ShardStore, trainer: ShardTrainer, num_shards: int) -> None:
    cfg = trainer.cfg
    ids = list(trainer.features.ids)
    check_num_shards(num_shards, len(ids))
    if len(set(ids)) != len(ids):
        raise StoreError("the training set holds duplicate example ids; a store needs one id per example")
    if cfg.dp_epsilon is not None:  # δ is a probability over the whole data set's records, not one shard's
        from taft.privacy.accounting import check_budget

        check_budget(cfg.dp_epsilon, cfg.dp_delta, len(ids))
    shards = assign_shards(ids, num_shards, cfg.seed)
    counts = [0] * num_shards
    for s in shards:
        counts[s] += 1
    written = _write_shard_features(store, trainer.features, dict(shard_jobs(ids, num_shards, cfg.seed)), {})
    with store.transaction() as db:
        db.executemany("INSERT INTO examples (id, shard, position, label) VALUES (?, ?, ?, ?)",
                       [(i, s, p, trainer.labels[i]) for p, (i, s) in enumerate(zip(ids, shards, strict=True))])
        db.executemany("INSERT INTO shards (shard, status, examples, generation) VALUES (?, ?, ?, 0)",
                       [(k, "untrained" if counts[k] else "empty", counts[k]) for k in range(num_shards)])
        fp = fingerprints(trainer.template)
        for key, value in (("format", "taft-shards/1"), ("config", dataclasses.asdict(cfg)),
                           ("num_shards", num_shards), ("base_fingerprint", fp["all"]),
                           ("features", None), ("features_info", trainer.features.info),
                           ("exclude", []), ("weights", "size"), ("dirty", False),
                           ("data_digest", split_digests(trainer.prep.splits, trainer.prep.data_fingerprint))):
            store.set_meta(db, key, value)
        _register_features(store, db, written)


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


def _begin(store: ShardStore, loaded: Loaded | None = None) -> None:
    """What every writing request does first: finish what an interrupted writer left (and bring a store made by an
    older taft up to date)."""
    store.ensure_id_key()
    _upgrade_features(store)
    _recompose_if_dirty(store, loaded)


def _trainer_for(store: ShardStore, cfg: TrainConfig, progress: bool, features: FeatureCache | None = None,
                 loaded: Loaded | None = None) -> ShardTrainer:
    """A trainer over the store's own features (no forgotten row; ``features``: those features, already read and
    checked by the caller), after checking w0 is the store's. ``loaded``: w0 and the validation features built
    once per process."""
    feats = features if features is not None else _read_features(store, loaded=loaded)
    labels = dict(store.db.execute("SELECT id, label FROM examples WHERE forgotten_in IS NULL").fetchall())
    if loaded is not None and loaded.trainer is not None:
        t = loaded.trainer
        return ShardTrainer(cfg, t.clf, feats, labels, val_features=t.val_features, val_labels=t.val_labels)
    trainer = ShardTrainer.from_config(cfg, progress=progress, features=feats, labels=labels)
    check_data(store, trainer, ["val"])
    if fingerprints(trainer.template)["all"] != store.get_meta("base_fingerprint"):
        raise StoreError(f"the model {cfg.model!r} loaded here differs from the one the store {store.root} was "
                         f"trained from (w0 fingerprint); load the same weights")
    if loaded is not None:
        loaded.trainer = trainer
    return trainer


# -- compose --------------------------------------------------------------------------------------------------
def _weights(store: ShardStore, shards: list[int], weights: str) -> list[float]:
    if weights == "uniform":
        return [1.0] * len(shards)
    if weights == "size":  # (an imported shard with undisclosed ids has no example rows: its recorded count)
        hidden = {r["shard"]: r["examples"] for r in store.shard_rows() if r["shard"] in set(store.undisclosed())}
        return [float(hidden[k] if k in hidden else len(store.live_ids(k))) for k in shards]
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"--weights {weights}: use size, uniform, or a JSON file {{\"shard\": weight}}")
    try:
        table = {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"--weights {path}: expected a JSON object {{\"shard\": weight}} ({e})") from e
    missing = [k for k in shards if k not in table]
    if missing:
        raise ConfigError(f"--weights {path}: no weight for live shard(s) {missing}")
    return [table[k] for k in shards]


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
    pending = {p for (p,) in store.db.execute("SELECT path FROM pending")}
    found = [store.rel(p) for d in (store.shards_dir, store.root / "features") if d.is_dir() for p in d.iterdir()]
    return sorted(f for f in found if f not in known and f not in pending)


def _compose(store: ShardStore, *, weights: str | None = None, exclude: Sequence[int] | None = None,
             loaded: Loaded | None = None) -> dict:
    """Average the live shards (minus ``exclude``) into ``STORE/composed``; record what was composed."""
    weights = weights or store.get_meta("weights", "size")
    exclude = sorted(set(exclude if exclude is not None else store.get_meta("exclude", [])))
    stray = _stray_files(store)
    if stray:
        raise StoreError(f"the store holds files the manifest does not list: {stray[:5]}; they are not shards of "
                         f"this store. Move them out (run `taft shards verify` for the full report)")
    rows = [r for r in store.shard_rows() if r["status"] == "live" and r["shard"] not in exclude]
    if not rows:
        raise StoreError("no live shard to compose (all excluded, dropped or untrained); run `taft shards train` "
                         "to train the missing shards, or compose with fewer --exclude")
    shards = [r["shard"] for r in rows]
    ws = _weights(store, shards, weights)
    deltas = [load_shard(store, r, loaded) for r in rows]
    composed = weighted_average([d for d, _ in deltas], ws)
    cfg = _store_config(store)
    target = store.composed_dir
    with store.transaction() as db:  # killed while composed/ is replaced: the next request composes again
        store.set_meta(db, "dirty", True)
    with RunFolder(target, overwrite=True) as folder:
        save_config(cfg, folder.path / "config.yaml")
        write_delta(composed, deltas[0][1], folder.path / "delta.safetensors", run_id=folder.run_id,
                    extra_metadata={"method": cfg.method, "model": cfg.model, "data": cfg.data,
                                    "composed_shards": json.dumps(shards)})
        info = {"shards": shards, "weights": ws, "weights_rule": weights, "exclude": exclude}
        if cfg.dp_epsilon is not None or any(r["privacy"] for r in rows):
            info["privacy"] = privacy_guarantee(store, rows)
        write_json(folder.path / "results.json", info)
        folder.commit(num_classes=int(store.db.execute("SELECT MAX(label) + 1 FROM examples").fetchone()[0]),
                      method=cfg.method, model=cfg.model, data=cfg.data, composed=info,
                      data_digest=store.get_meta("data_digest"))
    with store.transaction() as db:
        store.set_meta(db, "composed", {**info, "run_id": verify_run(target)["run_id"]})
        store.set_meta(db, "weights", weights)
        store.set_meta(db, "exclude", exclude)
        store.set_meta(db, "dirty", False)
    return {"composed": str(target), **info}


def privacy_guarantee(store: ShardStore, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a private store's composition guarantees. The composed model: the largest ε of its (disjoint) shards
    (parallel composition; averaging is post-processing). Every release so far: a shard retrained after a forget
    released another model on the same remaining records, so per shard the ε of all its generations compose
    sequentially (Opacus accountant over their histories); the store's total is the largest of those."""
    from taft.privacy.compose import parallel_guarantee, sequential_epsilon

    live = [json.loads(r["privacy"]) for r in rows if r["privacy"]]
    bare = [r["shard"] for r in rows if not r["privacy"]]
    history: dict[int, list[dict]] = {}
    for a in store.audit_rows():
        d = json.loads(a["detail"]) if a["outcome"] == "shard" else {}
        if d.get("privacy"):
            history.setdefault(d["shard"], []).append(d["privacy"])
    total = max((sequential_epsilon(h) for h in history.values()), default=0.0)
    if bare:  # one shard trained without DP-SGD: the average is not private at all
        return {"composed": None, "non_private_shards": bare, "all_releases_epsilon": None,
                "note": f"the composed model is NOT private: shard(s) {bare} have no privacy record (trained without "
                        f"DP-SGD); exclude them (`taft shards compose --exclude`) for a private composition"}
    out = {"composed": parallel_guarantee(live), "all_releases_epsilon": total,
           "note": "ε of the composed model (parallel over disjoint shards) and, over every model this store has "
                   "released, the largest per-shard sequential composition across retrains"}
    hidden = sorted(set(store.undisclosed()) & {r["shard"] for r in rows})
    if hidden:
        out["assumes"] = (f"imported shard(s) {hidden} did not disclose their ids: parallel composition assumes they "
                          f"hold none of the other shards' examples")
    return out


def _remove_composed(store: ShardStore) -> None:
    """No live shard is left: the old composition (built from forgotten examples too) is deleted."""
    if store.composed_dir.exists():
        store.add_pending(store.composed_dir)
        store.delete_files([store.composed_dir])
    with store.transaction() as db:
        store.set_meta(db, "composed", None)
        store.set_meta(db, "dirty", False)


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


def _recompose_if_dirty(store: ShardStore, loaded: Loaded | None = None) -> None:
    """A request that changed the shards was killed before it recomposed: compose now (under the lock)."""
    if store.get_meta("dirty", False):
        if any(r["status"] == "live" for r in store.shard_rows()):
            _compose(store, loaded=loaded)
        else:
            _remove_composed(store)


def compose(store_dir: str | Path, *, weights: str | None = None, exclude: Sequence[int] | None = None,
            loaded: Loaded | None = None) -> dict:
    """Write the weighted average of the live shards' Δw as ``STORE/composed`` (a run folder ``taft eval`` takes)."""
    with ShardStore(store_dir) as store:
        known = {r["shard"] for r in store.shard_rows()}
        bad = sorted(set(exclude or []) - known)
        if bad:
            raise ConfigError(f"--exclude {bad}: no such shard (the store has shards 0..{len(known) - 1})")
        with store.writing("compose", {"weights": weights, "exclude": list(exclude or [])}):
            out = _compose(store, weights=weights, exclude=exclude, loaded=loaded)
            with store.transaction() as db:
                store.finish(db, out)
        return out


# -- forget ---------------------------------------------------------------------------------------------------
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


# -- verify, status, evaluate -----------------------------------------------------------------------------------
def verify(store_dir: str | Path) -> dict[str, Any]:
    """Prove the store's state (after finishing what an interrupted writer left): every shard file matches its
    SHA-256 and the store's w0; no file outside the manifest; no forgotten example in any live shard's training
    set or in the features; the composed Δw equals a fresh recomposition of the live shards; the audit log agrees
    with the manifest. Returns ``{"ok": bool, "problems": [...], "checked": {...}}``."""
    with ShardStore(store_dir) as store, store.writing("verify", {}):
        if store.get_meta("config") is None:
            report = {"ok": False, "problems": ["the store was never completely created (its first `taft shards "
                                                "train` was interrupted); run it again with the same options"],
                      "checked": {"shards": 0, "live": 0, "forgotten": 0, "audit_rows": 0, "composed": []},
                      "incomplete": True}
            with store.transaction() as db:
                store.finish(db, report, "failed")
            return report
        _begin(store)
        problems: list[str] = []
        rows = store.shard_rows()
        live = [r for r in rows if r["status"] == "live"]
        forgotten = set(store.forgotten_ids())
        audit = store.audit_rows()
        shard_rows_logged = {(json.loads(a["detail"]).get("file"), json.loads(a["detail"]).get("sha256"))
                             for a in audit if a["outcome"] == "shard"}
        loaded = {}
        hidden = set(store.undisclosed())
        for r in rows:
            k = r["shard"]
            if r["status"] != "live":
                if r["file"]:
                    problems.append(f"shard {k} is {r['status']} but lists a file {r['file']}")
                continue
            try:
                delta, meta = load_shard(store, r)
            except StoreError as e:
                problems.append(str(e))
                continue
            loaded[k] = delta
            ids = store.live_ids(k)
            if forgotten & {store.tombstone(i) for i in ids}:
                problems.append(f"shard {k}: forgotten examples are listed as live again")
            if k in hidden:  # ids not disclosed: the file must be the model of the set its package described
                if meta.get("user.train_ids_sha256") != r["ids_sha256"] or ids:
                    problems.append(f"shard {k}: its model does not match the training set its package recorded")
            elif meta.get("user.train_ids_sha256") != ids_digest(ids) or r["ids_sha256"] != ids_digest(ids):
                problems.append(f"shard {k}: its model was trained on another set of examples than its live ones "
                                f"(a forgotten example, or a changed manifest); retrain it")
            if (r["file"], r["sha256"]) not in shard_rows_logged:
                problems.append(f"shard {k}: {r['file']} has no training record in the audit log")
        for f in _stray_files(store):
            problems.append(f"{f} is in the store but not in the manifest (a foreign or leftover file)")
        problems += _check_features(store, rows)
        composed = store.get_meta("composed")
        exclude = set(store.get_meta("exclude", []))
        want = [r["shard"] for r in live if r["shard"] not in exclude]
        if want:
            problems += _check_composed(store, composed, want, loaded)
        elif store.composed_dir.exists():
            problems.append("composed/ exists although no shard is live")
        problems += _check_audit(store, audit, forgotten)
        report = {"ok": not problems, "problems": problems,
                  "checked": {"shards": len(rows), "live": len(live), "forgotten": len(forgotten),
                              "audit_rows": len(audit), "composed": want}}
        with store.transaction() as db:
            store.finish(db, report, "ok" if not problems else "failed")
        return report


def _check_features(store: ShardStore, rows: list[dict[str, Any]]) -> list[str]:
    """Every shard with live examples has one features file, matching its SHA-256 and holding exactly its live
    examples; no other shard has one."""
    problems = []
    feats = store.feature_rows()
    imported = set(store.imported())  # trained elsewhere: no features here
    for r in rows:
        k, has = r["shard"], bool(store.live_ids(r["shard"])) and r["shard"] not in imported
        if has and k not in feats:
            problems.append(f"shard {k}: no features file is listed for its live examples")
        elif not has and k in feats:
            problems.append(f"shard {k} has no live example but lists a features file {feats[k]['file']}")
        elif has:
            try:
                _read_features(store, [k])
            except StoreError as e:
                problems.append(str(e))
    return problems


def _check_composed(store: ShardStore, composed: dict | None, want: list[int], loaded: dict) -> list[str]:
    if not composed:
        return ["no composition is recorded although shards are live; run `taft shards compose`"]
    if composed["shards"] != want:
        return [f"composed/ holds shards {composed['shards']}, the live ones are {want}; run `taft shards compose`"]
    try:
        delta = read_composed(store, composed)
    except StoreError as e:
        return [str(e)]
    if any(k not in loaded for k in want):
        return []  # a shard that failed its own check is reported already
    fresh = weighted_average([loaded[k] for k in want], _weights(store, want, composed["weights_rule"]))
    if set(fresh) != set(delta) or any(not torch.equal(fresh[n], delta[n]) for n in fresh):
        return ["composed/delta.safetensors differs from a fresh recomposition of the live shards"]
    return []


def read_composed(store: ShardStore, composed: dict | None = None) -> dict[str, Tensor]:
    """The composed Δw, after checking ``composed/`` against its run manifest (a withdrawn composition included)
    and against the composition the store's manifest recorded (``composed``: that record, default the store's)."""
    composed = composed if composed is not None else store.get_meta("composed") or {}
    try:
        manifest = verify_run(store.composed_dir)
        delta, meta = read_delta(store.composed_dir / "delta.safetensors")
    except (RunDirError, CheckpointError) as e:
        raise StoreError(f"composed/: {e}") from e
    if manifest["run_id"] != composed.get("run_id") or meta.get("run_id") != composed.get("run_id"):
        raise StoreError("composed/ is not the composition the manifest recorded (run id differs); run `taft shards "
                         "verify`")
    return delta


def _check_audit(store: ShardStore, audit: list[dict], forgotten: set[str]) -> list[str]:
    problems = []
    seqs = [a["seq"] for a in audit]
    if seqs != sorted(seqs) or len(set(seqs)) != len(seqs):
        problems.append("the audit log's sequence numbers are out of order")
    by_request: dict[int, list[dict]] = {}
    for a in audit:
        by_request.setdefault(a["request"], []).append(a)
    for req, entries in by_request.items():
        if entries[0]["outcome"] != "started":
            problems.append(f"audit request {req} has no 'started' row first")
        finals = [e for e in entries if e["outcome"] in ("ok", "error", "failed")]
        if len(finals) > 1:
            problems.append(f"audit request {req} ended more than once")
    logged = set()
    for a in audit:  # (a store made by an older taft logged the ids themselves)
        if a["outcome"] == "forgotten":
            logged.update(i if i.startswith(TOMBSTONE) else store.tombstone(i) for i in json.loads(a["detail"])["ids"])
    if forgotten - logged:
        problems.append(f"{len(forgotten - logged)} forgotten id(s) have no forget request in the audit log")
    if logged - forgotten:
        problems.append(f"{len(logged - forgotten)} id(s) logged as forgotten are live in the manifest")
    return problems


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
        out = []
        for d in deltas:
            tm = trainer.load(d)
            out.append(torch.cat([tm.suffix(cache.collate(list(range(s, min(s + cfg.eval_batch_size, len(cache)))),
                                                          trainer.device)).cpu()
                                  for s in range(0, len(cache), cfg.eval_batch_size)]))
        return torch.stack(out), ds.labels, shards


def evaluate_store(store_dir: str | Path, split: str = "test", *, max_eval: int | None = None) -> dict[str, Any]:
    """Accuracy of the composed model, of the shard models' outputs averaged with the composition's weights (the
    ensemble it equals for TAFT; excluded shards weigh 0), and of SISA's majority vote of the live shard models."""
    per_shard, labels, shards = shard_logits(store_dir, split, max_eval=max_eval)
    composed, _, _ = shard_logits(store_dir, split, which="composed", max_eval=max_eval)
    votes = torch.nn.functional.one_hot(per_shard.argmax(-1), per_shard.shape[-1]).sum(0)  # (N, C)
    with ShardStore(store_dir) as store:
        info = store.get_meta("composed") or {}
    weight = dict(zip(info.get("shards", []), info.get("weights", []), strict=True))
    w = torch.tensor([weight.get(k, 0.0) for k in shards], dtype=per_shard.dtype)  # the composition's weights
    ensemble = (w[:, None, None] * per_shard).sum(0) if w.sum() > 0 else per_shard.mean(0)
    return {"split": split, "examples": len(labels), "shards": shards,
            "composed": float((composed[0].argmax(-1) == labels).float().mean()),
            "ensemble_mean": float((ensemble.argmax(-1) == labels).float().mean()),
            "vote": float((votes.argmax(-1) == labels).float().mean()),
            "per_shard": [float((p.argmax(-1) == labels).float().mean()) for p in per_shard]}
