"""``taft shards train``: create a store (split the training set into shards, train one Δw per shard from the same
w0, compose them) or resume one; the shard-training backends (sequential, batched, Ray) that a forget's retrain and
:mod:`taft.shards.grow` use too.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from taft.checkpoint import delta_metadata, fingerprints, read_delta, write_delta
from taft.config import ConfigError, TrainConfig
from taft.data.examples import split_digests
from taft.data.shards import assign_shards, shard_jobs
from taft.shards.common import (
    Loaded,
    _live_shard,
    _register_features,
    _register_val_features,
    _same_setting,
    _store_config,
    _trainer_for,
    _write_shard_features,
    _write_val_features,
    ids_digest,
)
from taft.shards.composition import _begin, _compose
from taft.shards.store import ShardStore, StoreError, atomic_tmp
from taft.shards.training import ShardModel, ShardTrainer, check_backend, check_shard_config
from taft.train.pipeline import pin_paths
from taft.train.rundir import sha256_file

BACKENDS = ("sequential", "batched", "ray")
MAX_SHARDS = 100_000


def _write_shard(path: Path, model: ShardModel, meta: dict[str, str], ids: Sequence[str]) -> str:
    """Write one shard's Δw atomically (via :func:`atomic_tmp`); returns the file's SHA-256. Idempotent: a
    retried task writes the same bytes to the same name."""
    write_delta(model.delta, meta, path, tmp=atomic_tmp(path),
                extra_metadata={"shard": model.shard, "examples": len(ids), "train_ids_sha256": ids_digest(ids)})
    return sha256_file(path)


def _register_shard(store: ShardStore, model: ShardModel, path: Path, sha: str, ids: Sequence[str],
                    generation: int) -> None:
    """The shard's file is in place: make it live in its own transaction (one per shard, so a long run keeps what
    it trained), the composition marked out of date."""
    if sha256_file(path) != sha:
        raise StoreError(f"{path} changed while it was registered (SHA-256 differs); run the request again")
    with store.transaction() as db:
        _live_shard(store, db, model.shard, path, sha, examples=len(ids), ids_sha256=ids_digest(ids),
                    generation=generation, privacy=model.privacy, val_acc=model.val_acc, train_s=model.train_s)
        store.set_meta(db, "dirty", True)  # the composition no longer matches the live shards


def _train_jobs(store: ShardStore, trainer: ShardTrainer, jobs: list[tuple[int, list[str]]], backend: str,
                *, ray_address: str | None = None, chunk: int | None = None, progress: bool = False,
                loaded: Loaded | None = None) -> None:
    """Train ``jobs`` (shard, live ids) with ``backend`` and register each shard as it finishes."""
    if not jobs:
        return
    meta = _shard_meta(trainer, loaded)
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
        _keep_delta(store, loaded, paths[model.shard], sha, model.delta)


def _shard_meta(trainer: ShardTrainer, loaded: Loaded | None = None) -> dict[str, str]:
    """The metadata every shard file of the store carries (w0's fingerprints: hashing w0 once per process when
    ``loaded``)."""
    meta = (loaded.meta if loaded is not None and loaded.meta else None) or delta_metadata(trainer.template)
    if loaded is not None:
        loaded.meta = meta
    return meta


def _keep_delta(store: ShardStore, loaded: Loaded | None, path: Path, sha: str, delta: dict[str, Tensor]) -> None:
    """A long-lived process keeps the Δw it just wrote (the file's metadata as read_delta gives it: read once)."""
    if loaded is not None:
        loaded.deltas[(store.rel(path), sha)] = (delta, read_delta(path)[1])


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
    val_written = _write_val_features(store, trainer)
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
        _register_val_features(store, db, val_written)
