"""``taft shards compose``: the weighted average of the live shards' Δw as ``STORE/composed``, and what every writing
request does first (:func:`_begin`: finish an interrupted writer, recomposing a store left dirty).

Composition is :func:`taft.delta.weighted_average` over the live shards' Δw in shard order; its weights are
normalized to sum to 1 (``size``: each shard's number of live examples, so every example counts the same;
``uniform``; or a JSON file ``{"shard": weight}``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from taft.checkpoint import CheckpointError, read_delta, write_delta
from taft.config import ConfigError, save_config
from taft.delta import weighted_average
from taft.shards.common import Loaded, _store_config, _stray_files, _upgrade_features, load_shard
from taft.shards.store import ShardStore, StoreError
from taft.train.rundir import RunDirError, RunFolder, verify_run, write_json

WEIGHTS = ("size", "uniform")


def _begin(store: ShardStore, loaded: Loaded | None = None) -> None:
    """What every writing request does first: finish what an interrupted writer left (and bring a store made by an
    older taft up to date)."""
    store.ensure_id_key()
    _upgrade_features(store)
    _recompose_if_dirty(store, loaded)


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
