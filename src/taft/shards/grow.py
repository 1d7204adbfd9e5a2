"""Stores that grow: new training data (:func:`add_data`) and shards trained by another store (:func:`export_shard`,
:func:`import_shard`), with the guarantees of a store built at once.

**Adding data** trains new shards from the store's own w0 and configuration on examples it has not seen: ids already
in the store, held out (its validation and test splits stay its own), or forgotten earlier (recognized by their
tombstones, :meth:`ShardStore.tombstone`) are skipped with a count, never trained on again. New shards take the next
indices K, K+1, … (seed per shard as always: ``cfg.seed + k``), so a store trained on A and then given B holds,
shard for shard, the models of a store trained on A ∪ B with that assignment (bitwise; ``tests/shards/test_grow.py``).

**A package** (``export``) is a folder: ``delta.safetensors`` (the shard file, byte for byte), ``ids.json`` (its
example ids, unless ``--no-ids``: then only their count and SHA-256) and ``manifest.json`` (w0's fingerprint, the
training setting, the classes, the privacy record and the SHA-256 of every file). No pickle. ``import`` accepts it
into another store only if w0, setting and classes match, every hash holds and (ids disclosed) none of its examples
is one ``add`` would skip; an imported shard has no training
features here, so it is never retrained: forgetting one of its examples drops it, and a shard whose ids were not
disclosed can only be dropped as a whole (:func:`drop_shard`).

Every request is one locked, audited request of the store (:meth:`ShardStore.writing`). New shard files are written
first (recorded as pending), then a single transaction makes all of them live with their examples, features and
audit rows; a kill before it leaves the old store (the pending files are deleted on the next open), a kill after it
the new one (recomposed by the next request, as after any change).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from taft._version import __version__ as taft_version
from taft.checkpoint import CheckpointError, fsync_dir, fsync_file, read_delta
from taft.config import ConfigError, TrainConfig
from taft.data.examples import check_digests, split_digests
from taft.data.shards import shard_jobs
from taft.shards.common import (
    _RUN_ONLY,
    Loaded,
    _live_shard,
    _register_features,
    _store_config,
    _trainer_for,
    _withdraw_composed,
    _write_shard_features,
    ids_digest,
    load_shard,
)
from taft.shards.composition import _begin, _compose, _remove_composed
from taft.shards.create import BACKENDS, _keep_delta, _shard_meta, _train_ray, _write_shard, check_num_shards
from taft.shards.store import ShardStore, StoreError, atomic_tmp, publish
from taft.shards.training import ShardTrainer, check_backend
from taft.train.cache import FeatureCache
from taft.train.rundir import sha256_file

PACKAGE_FORMAT = "taft-shard-package/1"
# options that may differ between two stores whose shards compose: where the data is, how much of it, privacy (each
# shard carries its own record)
_DATA_FIELDS = ("data", "data_root", "test_file", "num_classes", "class_names", "max_train")


def setting(cfg: TrainConfig) -> dict[str, Any]:
    """What a shard's model depends on besides its examples: the store's options without where the data is, the
    run-only options and the privacy options (a shard's own privacy record travels with it)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in _RUN_ONLY and k not in _DATA_FIELDS and not k.startswith("dp_")}


def _classes(store: ShardStore, splits=None) -> dict[str, Any]:
    """The store's classes (``num_classes`` and their names, or None), recorded in meta ``classes`` at its first
    growth; before that read from its data (``splits``: already loaded)."""
    known = store.get_meta("classes")
    if known is not None:
        return known
    cfg = _store_config(store)
    splits = splits if splits is not None else _store_splits(store)
    from taft.data.text import SENTENCE_TASKS
    from taft.train.pipeline import class_name_list

    task = SENTENCE_TASKS.get(cfg.data)
    names = class_name_list(cfg.class_names) or (list(task.descriptions) if task else None) \
        or (list(splits.train.class_names) if splits.train.class_names else None)
    return {"num_classes": splits.train.num_classes, "names": names,
            "labels": list(splits.train.class_names) if splits.train.class_names else None}


def _store_splits(store: ShardStore):
    """The store's text data (train, validation, test) read again, without loading its model."""
    from taft.data.text import load_text_dataset

    cfg = _store_config(store)
    return load_text_dataset(cfg.data, cfg.test_file, root=cfg.data_root, seed=cfg.seed, num_classes=cfg.num_classes)


def _refusal(store: ShardStore, splits) -> Callable[[str], str | None]:
    """Why the store must not train on the example with id ``i``: ``in_store`` (it holds it: shards are disjoint),
    ``forgotten`` (recognized by its tombstone: it never comes back) or ``held_out`` (in its validation or test split,
    by content whatever the split's id prefix: they measure the store), else None. ``splits``: the store's data,
    checked here against the content hashes it was made with (held-out ids from other files would let test examples
    in)."""
    check_digests(store.get_meta("data_digest"), splits, ["val", "test"], what=f"the store {store.root}",
                  spec=_store_config(store).data)
    in_store = {i for (i,) in store.db.execute("SELECT id FROM examples WHERE forgotten_in IS NULL")}
    stones = set(store.forgotten_ids())
    held_out = {i.split(":", 1)[-1] for ds in (splits.val, splits.test) if ds is not None for i in ds.ids}

    def why(i: str) -> str | None:
        return ("in_store" if i in in_store else "forgotten" if store.tombstone(i) in stones
                else "held_out" if i.split(":", 1)[-1] in held_out else None)

    return why


def _sources(store: ShardStore) -> list[dict[str, Any]]:
    """The store's data sources (meta ``data_sources``): its first training set, then every addition and import."""
    known = store.get_meta("data_sources")
    if known is not None:
        return known
    first = [r["shard"] for r in store.shard_rows() if r["shard"] not in store.origins()]
    n = store.db.execute(f"SELECT COUNT(*) FROM examples WHERE shard IN ({','.join('?' * len(first))})",
                         first).fetchone()[0]
    return [{"kind": "train", "data": _store_config(store).data,
             "train": (store.get_meta("data_digest") or {}).get("train"), "examples": n, "shards": first}]


def _next_shard(store: ShardStore) -> int:
    return max((r["shard"] for r in store.shard_rows()), default=-1) + 1


# -- add ----------------------------------------------------------------------------------------------------------
def add_data(store_dir: str | Path, data: str | Path, *, num_shards: int | None = None, backend: str = "sequential",
             strict: bool = False, progress: bool = False, ray_address: str | None = None,
             chunk: int | None = None, loaded: Loaded | None = None) -> dict[str, Any]:
    """Train new shards on the examples of ``data`` (a .txt/.csv/.jsonl file, every row a training example) that the
    store has not seen, from its w0 and configuration, and recompose (the store's weights rule; size at first).

    ``num_shards``: how many new shards (default: as many as keep the store's mean live shard size). Examples
    already in the store, in its validation or test split, or forgotten earlier are skipped and counted
    (``strict``: refused instead). ``loaded``: w0, the validation features and the shards a long-lived process
    keeps (:class:`ShardSession`); the new shards' Δw and features join them."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    path = Path(data).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"--data {data}: not a file; `taft shards add` takes a .txt, .csv or .jsonl file whose "
                          f"rows are all new training examples (the store keeps its own validation and test splits)")
    with ShardStore(store_dir) as store, store.writing("add", {"data": str(path), "shards": num_shards,
                                                               "backend": backend}):
        if store.get_meta("config") is None:
            raise StoreError(f"the store {store.root} was never completely created; run `taft shards train` again "
                             f"with the same options first")
        _begin(store, loaded)
        cfg = _store_config(store)
        check_backend(cfg, backend)
        # w0, the validation features and the data pipeline (its train features are the new examples'), checked
        # against the store once per process
        base = (loaded.trainer if loaded is not None and loaded.trainer is not None
                else _trainer_for(store, cfg, progress, features=FeatureCache([], ids=[]), loaded=loaded))
        classes = _classes(store, base.prep.splits)
        new, skipped = _new_examples(store, base, path, classes)
        if strict and any(skipped.values()):
            raise StoreError(f"--data {path}: {_skip_text(skipped)}; nothing was added (without --strict they are "
                             f"skipped)")
        if not new:
            raise StoreError(f"--data {path} holds no new training example ({_skip_text(skipped)}); nothing to add")
        n_new = _default_shards(store, len(new)) if num_shards is None else num_shards
        check_num_shards(n_new, len(new))
        if cfg.dp_epsilon is not None:  # δ is over the whole training set, which grows
            from taft.privacy.accounting import check_budget

            check_budget(cfg.dp_epsilon, cfg.dp_delta, len(store.all_live_ids()) + len(new))
        t0 = time.perf_counter()
        feats = base.prep.cache_for(base.template, new, "train", progress, None, "")
        trainer = ShardTrainer(cfg, base.clf, feats, dict(zip(new.ids, new.labels.tolist(), strict=True)),
                               val_features=base.val_features, val_labels=base.val_labels)
        first = _next_shard(store)
        groups = dict(shard_jobs(new.ids, n_new, cfg.seed))
        jobs = [(first + j, groups[j]) for j in sorted(groups)]
        written = _write_shard_features(store, feats, dict(jobs), {})
        models = _train_new(store, trainer, jobs, backend, progress=progress, ray_address=ray_address, chunk=chunk,
                            loaded=loaded)
        train_s = time.perf_counter() - t0
        ids_of = dict(jobs)
        position = store.db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM examples").fetchone()[0]
        shard_of = {i: k for k, ids in jobs for i in ids}
        source = {"kind": "add", "data": str(path), "train": source_digest(new.ids),
                  "examples": len(new), "shards": [first + j for j in range(n_new)], "request": store.request}
        with store.transaction() as db:
            db.executemany("INSERT INTO examples (id, shard, position, label) VALUES (?, ?, ?, ?)",
                           [(i, shard_of[i], position + p, y) for p, (i, y) in
                            enumerate(zip(new.ids, new.labels.tolist(), strict=True))])
            for k, (model, shard_path, sha) in models.items():
                _live_shard(store, db, k, shard_path, sha, examples=len(ids_of[k]), ids_sha256=ids_digest(ids_of[k]),
                            generation=1, privacy=model.privacy, val_acc=model.val_acc, train_s=model.train_s)
            db.executemany("INSERT INTO shards (shard, status, examples, generation) VALUES (?, 'empty', 0, 0)",
                           [(first + j,) for j in range(n_new) if j not in groups])
            _register_features(store, db, written)
            origins = {str(k): v for k, v in store.origins().items()}
            origins.update({str(k): {"kind": "added", "request": store.request, "ids": True} for k, _ in jobs})
            store.set_meta(db, "origins", origins)
            store.set_meta(db, "data_sources", [*_sources(store), source])
            store.set_meta(db, "classes", classes)
            store.set_meta(db, "dirty", True)
            store.record(db, "added", {"examples": len(new), "shards": [k for k, _ in jobs], "skipped": skipped})
        if loaded is not None:
            loaded.keep_features(store, {k: feats.subset(list(ids)) for k, ids in jobs})
            for model, shard_path, sha in models.values():
                _keep_delta(store, loaded, shard_path, sha, model.delta)
        composed = _compose(store, loaded=loaded)
        out = {"added": len(new), "skipped": skipped, "shards": [k for k, _ in jobs],
               "empty_shards": [first + j for j in range(n_new) if j not in groups], "train_s": train_s,
               "composed": composed}
        with store.transaction() as db:
            store.finish(db, {**out, "composed": composed["shards"]})
        return out


def source_digest(ids: Sequence[str]) -> str:
    """The content hash a data source records (meta ``data_sources``): the training-split digest
    (:func:`split_digests`) of its examples' ids in file order; ``verify`` recomputes it while they are all live."""
    from taft.data.examples import DatasetSplits

    return split_digests(DatasetSplits(SimpleNamespace(ids=list(ids)), None, None))["train"]


def _skip_text(skipped: dict[str, int]) -> str:
    words = {"in_store": "already in the store", "forgotten": "forgotten earlier (they never come back)",
             "held_out": "in the store's validation or test split"}
    return ", ".join(f"{n} {words[k]}" for k, n in skipped.items() if n) or "no example skipped"


def _new_examples(store: ShardStore, base: ShardTrainer, path: Path, classes: dict[str, Any]):
    """The rows of ``path`` the store may train on, in file order, and the counts of the skipped ones."""
    from taft.data.formats import read_text_file

    ds = read_text_file(path, split="train", num_classes=classes["num_classes"], label_names=classes.get("labels"),
                        name=path.stem.split(".")[0])
    if ds.num_classes != classes["num_classes"]:
        raise StoreError(f"--data {path} has {ds.num_classes} classes, the store {classes['num_classes']}; add "
                         f"examples of the store's classes only")
    refusal = _refusal(store, base.prep.splits)
    keep = []
    skipped = {"in_store": 0, "forgotten": 0, "held_out": 0}
    for p, i in enumerate(ds.ids):  # (ids are unique in a file: the k-th repeat of a sentence is its own example)
        why = refusal(i)
        if why:
            skipped[why] += 1
        else:
            keep.append(p)
    return ds.subset(keep), skipped


def _default_shards(store: ShardStore, examples: int) -> int:
    """New shards of about the store's mean live shard size."""
    sizes = [r["examples"] for r in store.shard_rows() if r["status"] == "live"]
    size = sum(sizes) / len(sizes) if sizes else examples
    return max(1, min(examples, round(examples / max(size, 1))))


def _train_new(store: ShardStore, trainer: ShardTrainer, jobs: list[tuple[int, list[str]]], backend: str, *,
               progress: bool, ray_address: str | None, chunk: int | None,
               loaded: Loaded | None = None) -> dict[int, tuple[Any, Path, str]]:
    """Train ``jobs`` and write each shard's file (pending: nothing is registered here). Returns
    ``{shard: (model, path, sha256)}``."""
    meta = _shard_meta(trainer, loaded)
    paths = {k: store.shard_file(k, 1) for k, _ in jobs}
    ids_of = dict(jobs)
    store.add_pending(*paths.values(), *(atomic_tmp(p) for p in paths.values()))
    out = {}
    if backend == "ray":
        for model, sha in _train_ray(trainer, jobs, paths, meta, ray_address):
            out[model.shard] = (model, paths[model.shard], sha)
        return out
    if backend == "batched":
        models = trainer.train_batched(jobs, chunk=chunk)
    else:
        from tqdm.auto import tqdm

        models = (trainer.train_one(k, ids) for k, ids in tqdm(jobs, desc="new shards", disable=not progress))
    for model in models:
        out[model.shard] = (model, paths[model.shard], _write_shard(paths[model.shard], model, meta,
                                                                        ids_of[model.shard]))
    for _, p, sha in out.values():
        if sha256_file(p) != sha:
            raise StoreError(f"{p} changed while it was written (SHA-256 differs); run the request again")
    return out


# -- export ---------------------------------------------------------------------------------------------------------
def export_shard(store_dir: str | Path, shard: int, out: str | Path, *, ids: bool = True) -> dict[str, Any]:
    """Write live shard ``shard`` as a self-contained package folder ``out`` (see the module docstring); with
    ``ids=False`` its example ids stay here (the package holds their count and SHA-256 only). The export is an
    audited request of the store. Returns the package's manifest."""
    dst = Path(out).expanduser().absolute()
    if dst.exists():
        raise ConfigError(f"--out {dst} exists; choose a new folder for the package")
    with ShardStore(store_dir) as store, store.writing("export", {"shard": shard, "ids": ids}):
        _begin(store)
        row = store.shard_row(shard)
        if row is None or row["status"] != "live":
            live = [r["shard"] for r in store.shard_rows() if r["status"] == "live"]
            raise StoreError(f"--shard {shard}: " + ("no such shard" if row is None else f"it is {row['status']}")
                             + f"; the live shards are {live}")
        _, meta = load_shard(store, row)  # its SHA-256 and w0 checked
        if meta.get("user.train_ids_sha256") != row["ids_sha256"]:
            raise StoreError(f"shard {shard}: its file records another training set than the manifest; run `taft "
                             f"shards verify --store {store.root}`")
        hidden = shard in store.undisclosed()
        train_ids = [] if hidden else store.live_ids(shard)
        if not hidden and ids_digest(train_ids) != row["ids_sha256"]:
            raise StoreError(f"shard {shard}: its model was not trained on its live examples; run `taft shards "
                             f"verify --store {store.root}`")
        disclose = ids and not hidden
        manifest = {"format": PACKAGE_FORMAT, "taft_version": taft_version,
                    "shard": {"examples": row["examples"], "ids_sha256": row["ids_sha256"],
                              "privacy": json.loads(row["privacy"]) if row["privacy"] else None,
                              "val_acc": row["val_acc"]},
                    "ids": "disclosed" if disclose else "undisclosed",
                    "base_fingerprint": store.get_meta("base_fingerprint"),
                    "setting": setting(_store_config(store)), "classes": _classes(store), "files": {}}
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            shutil.copyfile(store.root / row["file"], tmp / "delta.safetensors")
            if disclose:
                (tmp / "ids.json").write_text(json.dumps({"ids": train_ids}))
            for name in sorted(p.name for p in tmp.iterdir()):
                manifest["files"][name] = sha256_file(tmp / name)
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            for p in tmp.iterdir():
                fsync_file(p)
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with store.transaction() as db:
            store.finish(db, {"shard": shard, "ids": manifest["ids"], "examples": row["examples"],
                              "delta_sha256": manifest["files"]["delta.safetensors"]})
        return {**manifest, "package": str(dst), "manifest_sha256": sha256_file(dst / "manifest.json")}


# -- import ---------------------------------------------------------------------------------------------------------
def read_package(package: str | Path) -> tuple[dict[str, Any], list[str] | None, Path]:
    """A package's manifest and ids (None: not disclosed), after checking every file against its SHA-256 and the
    shard file's own metadata against the manifest. Refuses anything else, saying what is wrong."""
    pkg = Path(package).expanduser().absolute()
    fix = "ask for the package again (`taft shards export`)"
    if not (pkg / "manifest.json").is_file():
        raise StoreError(f"{pkg} is not a shard package (no manifest.json); {fix}")
    try:
        manifest = json.loads((pkg / "manifest.json").read_text())
        assert isinstance(manifest, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise StoreError(f"{pkg}/manifest.json is not a JSON object (damaged); {fix}") from None
    if manifest.get("format") != PACKAGE_FORMAT:
        raise StoreError(f"{pkg} has format {manifest.get('format')!r}; this taft reads {PACKAGE_FORMAT!r}")
    files = manifest.get("files") or {}
    want = {"delta.safetensors"} | ({"ids.json"} if manifest.get("ids") == "disclosed" else set())
    present = {p.name for p in pkg.iterdir()} - {"manifest.json"}
    if set(files) != want or present != want:
        raise StoreError(f"{pkg} holds files {sorted(present)}, its manifest lists {sorted(files)} (expected "
                         f"{sorted(want)}): the package was changed; {fix}")
    for name, sha in files.items():
        if sha256_file(pkg / name) != sha:
            raise StoreError(f"{pkg}/{name} does not match the SHA-256 in its manifest (tampered or damaged); {fix}")
    try:
        _, meta = read_delta(pkg / "delta.safetensors")
    except CheckpointError as e:
        raise StoreError(f"{pkg}/delta.safetensors: {e}") from e
    shard = manifest.get("shard") or {}
    if (meta.get("base_fingerprint") != manifest.get("base_fingerprint")
            or meta.get("user.train_ids_sha256") != shard.get("ids_sha256")
            or meta.get("user.examples") != str(shard.get("examples"))):
        raise StoreError(f"{pkg}: the manifest does not describe its delta.safetensors (w0, examples or their "
                         f"digest differ): the package was changed; {fix}")
    ids = None
    if manifest.get("ids") == "disclosed":
        ids = json.loads((pkg / "ids.json").read_text()).get("ids")
        if not isinstance(ids, list) or ids_digest(ids) != shard.get("ids_sha256") or len(set(ids)) != len(ids):
            raise StoreError(f"{pkg}/ids.json does not match the shard's training set (digest or count); {fix}")
    return manifest, ids, pkg


def import_shard(store_dir: str | Path, package: str | Path, *, loaded: Loaded | None = None) -> dict[str, Any]:
    """Accept a package (:func:`export_shard`) as a new live shard of this store and recompose. Refused, with the
    reason, unless every hash holds and its classes, w0 and setting are this store's; a shard holding an example
    that is in this store, was forgotten here or is in its validation or test split is refused too (the shards would
    not be disjoint, a forgotten example would come back, or the store would be measured on what it trained on).
    ``loaded``: what a long-lived process keeps (:class:`ShardSession`)."""
    manifest, ids, pkg = read_package(package)
    with ShardStore(store_dir) as store, store.writing("import", {"package": str(pkg), "ids": manifest["ids"]}):
        if store.get_meta("config") is None:
            raise StoreError(f"the store {store.root} was never completely created; run `taft shards train` first")
        _begin(store, loaded)
        splits = _store_splits(store) if ids is not None else None
        _check_compatible(store, manifest, pkg, splits)
        delta_sha = manifest["files"]["delta.safetensors"]
        dup = [r["shard"] for r in store.shard_rows() if r["sha256"] == delta_sha]
        if dup:
            raise StoreError(f"{pkg} is already in this store (shard {dup[0]}); nothing was imported")
        if ids is not None:  # the examples `add` would skip refuse the whole shard (it cannot be split here)
            refusal = _refusal(store, splits)
            found = {why: 0 for why in _IMPORT_REFUSALS}
            for i in ids:
                if (why := refusal(i)) is not None:
                    found[why] += 1
            if any(found.values()):
                raise StoreError(f"{pkg}: its shard was trained on " + " and ".join(
                    f"{n} {_IMPORT_REFUSALS[why]}" for why, n in found.items() if n)
                    + "; nothing was imported. Ask the exporter to forget them and export the shard again")
        k = _next_shard(store)
        path = store.shard_file(k, 1)
        tmp = atomic_tmp(path)
        store.add_pending(path, tmp)
        shutil.copyfile(pkg / "delta.safetensors", tmp)
        publish(tmp, path)
        if sha256_file(path) != delta_sha:
            raise StoreError(f"{path} changed while it was imported (SHA-256 differs); run the request again")
        shard = manifest["shard"]
        position = store.db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM examples").fetchone()[0]
        source = {"kind": "import", "package_sha256": delta_sha, "examples": shard["examples"],
                  "ids": manifest["ids"], "ids_sha256": shard["ids_sha256"], "shards": [k], "request": store.request}
        with store.transaction() as db:
            if ids is not None:  # label -1: an imported example's label is not known here (its features neither)
                db.executemany("INSERT INTO examples (id, shard, position, label) VALUES (?, ?, ?, -1)",
                               [(i, k, position + p) for p, i in enumerate(ids)])
            _live_shard(store, db, k, path, delta_sha, examples=shard["examples"], ids_sha256=shard["ids_sha256"],
                        generation=1, privacy=shard["privacy"], val_acc=None, train_s=None)
            origins = {str(j): v for j, v in store.origins().items()}
            origins[str(k)] = {"kind": "imported", "request": store.request, "ids": ids is not None,
                               "package_sha256": delta_sha}
            store.set_meta(db, "origins", origins)
            store.set_meta(db, "data_sources", [*_sources(store), source])
            store.set_meta(db, "dirty", True)
            store.record(db, "imported", {"shard": k, "examples": shard["examples"], "ids": manifest["ids"]})
        composed = _compose(store, loaded=loaded)
        out = {"shard": k, "examples": shard["examples"], "ids": manifest["ids"], "privacy": shard["privacy"],
               "composed": composed}
        with store.transaction() as db:
            store.finish(db, {**out, "composed": composed["shards"]})
        return out


_IMPORT_REFUSALS = {"in_store": "example(s) this store already holds (shards must be disjoint)",
                    "forgotten": "example(s) forgotten here (they must not come back)",
                    "held_out": "example(s) of this store's validation or test split (they measure it: it must "
                                "never train on them)"}


def _check_compatible(store: ShardStore, manifest: dict[str, Any], pkg: Path, splits=None) -> None:
    mine = _classes(store, splits)
    theirs = manifest.get("classes") or {}
    if theirs.get("num_classes") != mine["num_classes"] or theirs.get("names") != mine["names"]:
        raise StoreError(f"{pkg}: its classes ({theirs.get('num_classes')}: {theirs.get('names')}) are not this "
                         f"store's ({mine['num_classes']}: {mine['names']}); a shard composes only with shards of "
                         f"the same label space: import it into a store of those classes")
    if manifest.get("base_fingerprint") != store.get_meta("base_fingerprint"):
        raise StoreError(f"{pkg}: its shard was trained from another w0 (base fingerprint "
                         f"{str(manifest.get('base_fingerprint'))[:12]}…, this store's "
                         f"{store.get_meta('base_fingerprint')[:12]}…); Δw only composes over the same w0: import it "
                         f"into a store made from the same model, head and seed")
    ours = setting(_store_config(store))
    theirs_setting = manifest.get("setting") or {}
    diff = sorted(k for k in set(ours) | set(theirs_setting) if ours.get(k) != theirs_setting.get(k))
    if diff:
        what = ", ".join(f"{k}={theirs_setting.get(k)!r} (here {ours.get(k)!r})" for k in diff[:6])
        raise StoreError(f"{pkg}: its shard was trained with another setting: {what}; import it into a store made "
                         f"with the same options, or retrain it with this store's (`taft shards status --json` shows "
                         f"them)")


# -- drop -----------------------------------------------------------------------------------------------------------
def drop_shard(store_dir: str | Path, shard: int) -> dict[str, Any]:
    """Drop an imported shard whose ids were not disclosed (the only way to forget its examples): its file is
    deleted and the store recomposed. Shards with known ids are forgotten by id (:func:`taft.shards.forget`)."""
    with ShardStore(store_dir) as store, store.writing("drop", {"shard": shard}):
        _begin(store)
        row = store.shard_row(shard)
        if shard not in store.undisclosed():
            raise StoreError(f"--shard {shard}: only an imported shard whose ids were not disclosed is dropped as a "
                             f"whole (this store's: {store.undisclosed()}); forget other examples by id with "
                             f"`taft shards forget`")
        if row["status"] != "live":
            raise StoreError(f"--shard {shard} is {row['status']} already; nothing to drop")
        old = store.root / row["file"]
        _withdraw_composed(store)
        with store.transaction() as db:
            db.execute("UPDATE shards SET status = 'dropped', file = NULL, sha256 = NULL WHERE shard = ?", (shard,))
            db.execute("INSERT OR IGNORE INTO pending (path) VALUES (?)", (store.rel(old),))
            store.set_meta(db, "dirty", True)
            store.record(db, "dropped", {"shard": shard, "examples": row["examples"]})
        store.delete_files([old])
        live = [r for r in store.shard_rows() if r["status"] == "live"]
        composed = _compose(store) if live else _remove_composed(store)
        out = {"dropped": shard, "examples": row["examples"], "composed": composed}
        with store.transaction() as db:
            store.finish(db, out)
        return out


__all__ = ["PACKAGE_FORMAT", "add_data", "drop_shard", "export_shard", "import_shard", "read_package", "setting"]
