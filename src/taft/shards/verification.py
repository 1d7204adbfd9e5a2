"""``taft shards verify``: prove a store's state (shard files, features, composition, audit log) after finishing
what an interrupted writer left."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from taft.delta import weighted_average
from taft.shards.common import _read_features, _stray_files, ids_digest, load_shard
from taft.shards.composition import _begin, _weights, read_composed
from taft.shards.grow import source_digest
from taft.shards.store import TOMBSTONE, ShardStore, StoreError
from taft.train.cache import FeatureCache
from taft.train.rundir import sha256_file


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
        problems += _check_val_features(store)
        composed = store.get_meta("composed")
        exclude = set(store.get_meta("exclude", []))
        want = [r["shard"] for r in live if r["shard"] not in exclude]
        if want:
            problems += _check_composed(store, composed, want, loaded)
        elif store.composed_dir.exists():
            problems.append("composed/ exists although no shard is live")
        problems += _check_audit(store, audit, forgotten)
        problems += _check_sources(store, rows, audit)
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


def _check_val_features(store: ShardStore) -> list[str]:
    """The validation features the manifest lists (if any) match their SHA-256 and count and can be read."""
    rec = store.get_meta("val_features")
    if not rec:
        return []
    path = store.root / rec["file"]
    fix = ("the store encodes the validation split again meanwhile (no answer changes), and its next `taft shards "
           "train --store` or `forget` writes them anew")
    try:
        if sha256_file(path) != rec["sha256"]:
            return [f"{rec['file']} (the validation features) does not match the SHA-256 in the manifest; {fix}"]
        if len(FeatureCache.load(path, expect_info=store.get_meta("features_info"))) != rec["examples"]:
            return [f"{rec['file']} (the validation features) does not hold the {rec['examples']} examples the "
                    f"manifest records; {fix}"]
    except FileNotFoundError:
        return [f"{rec['file']} (the validation features) is missing; {fix}"]
    except Exception as e:
        return [f"{rec['file']} (the validation features) cannot be read ({e}); {fix}"]
    return []


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


_SOURCE_HASHES = {"train": ("train",), "add": ("train",), "import": ("package_sha256", "ids_sha256")}


def _check_sources(store: ShardStore, rows: list[dict[str, Any]], audit: list[dict]) -> list[str]:
    """The data sources a grown store records (meta ``data_sources``: its first training set, every ``add`` and
    ``import``): each carries its content hash and agrees with the manifest — every shard comes from exactly one
    source, a source's example count is its shards' rows (forgotten ones included), its request logged it, an added
    set's ids still hash to its digest while all are live, and a live imported shard is still the package's file."""
    sources = store.get_meta("data_sources")
    if sources is None:
        return []  # never grown: its one training set is the data digest, checked whenever the data is read
    fix = "the manifest was changed outside taft; restore the store from a backup"
    by_shard = {r["shard"]: r for r in rows}
    logged = {(a["request"], a["outcome"]): json.loads(a["detail"]) for a in audit
              if a["outcome"] in ("added", "imported")}
    problems, owner = [], {}
    for n, src in enumerate(sources):
        kind, shards = src.get("kind"), src.get("shards") or []
        what = f"data source {n} ({kind}{' of ' + str(src['data']) if src.get('data') else ''})"
        if kind not in _SOURCE_HASHES:
            problems.append(f"{what}: unknown kind; {fix}")
            continue
        missing = [h for h in _SOURCE_HASHES[kind] if not _is_sha256(src.get(h))]
        if missing:
            problems.append(f"{what} has no content hash ({', '.join(missing)}); {fix}")
        for k in shards:
            if k in owner:
                problems.append(f"shard {k} is listed by data sources {owner[k]} and {n}; {fix}")
            elif k not in by_shard:
                problems.append(f"{what} lists shard {k}, which the store does not have; {fix}")
            owner.setdefault(k, n)
        marks = ",".join("?" * len(shards))
        ids = [i for (i,) in store.db.execute(f"SELECT id FROM examples WHERE shard IN ({marks}) ORDER BY position",
                                              shards)]
        if (kind != "import" or src.get("ids") == "disclosed") and len(ids) != src.get("examples"):
            problems.append(f"{what} records {src.get('examples')} examples, its shards {shards} hold {len(ids)}; "
                            f"{fix}")
        if kind == "train" and src.get("train") != (store.get_meta("data_digest") or {}).get("train"):
            problems.append(f"{what}: its content hash is not the store's training data digest; {fix}")
        if kind == "add" and not any(i.startswith(TOMBSTONE) for i in ids) and source_digest(ids) != src.get("train"):
            problems.append(f"{what}: its examples' ids do not hash to the digest it recorded; {fix}")
        if kind in ("add", "import"):
            record = logged.get((src.get("request"), "added" if kind == "add" else "imported"))
            if record is None or record.get("examples") != src.get("examples"):
                problems.append(f"{what} has no matching record of its request {src.get('request')} in the audit "
                                f"log; {fix}")
        row = by_shard.get(shards[0]) if kind == "import" and shards else None
        if row is not None and row["status"] == "live" and (row["sha256"] != src.get("package_sha256")
                                                            or row["ids_sha256"] != src.get("ids_sha256")):
            problems.append(f"shard {row['shard']} is not the package {what} recorded (SHA-256 of its file or "
                            f"ids); {fix}")
    unlisted = sorted(set(by_shard) - set(owner))
    if unlisted:
        problems.append(f"shard(s) {unlisted} come from no recorded data source; {fix}")
    return problems


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
