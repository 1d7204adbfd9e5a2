"""The shard store: a folder with a SQLite manifest, one Δw file per shard and an append-only audit log.

Layout of ``STORE/``::

    manifest.sqlite    examples (id → shard, forgotten?), shards (file, SHA-256, size, accuracy), meta, audit
    store.lock         the writer lock (filelock): one writer at a time, across processes and machines sharing it
    shards/            shard-0003-g1.safetensors: Δw of shard 3, generation 1 (a retrain makes generation 2)
    features/          shard-0003-f1.safetensors: the frozen-prefix features of shard 3's live training examples
                       (no forgotten example's row; a forget rewrites only its shards' files)
    composed/          the composition of the live shards, a normal run folder (`taft eval STORE/composed`)

**Crash safety.** A file is written as a temporary sibling, fsynced and renamed; the manifest learns of it in one
transaction after it is in place. Before any file is written its path is recorded in ``pending``; a transaction
that makes a file part of the store (or supersedes one) removes it from (or adds it to) ``pending`` in the same
commit. Opening the store for writing deletes every path still pending, so a writer killed at any point leaves
the store as before the interrupted step or after it, and a stray temporary file is never mistaken for a shard.
A composition interrupted after its shards changed is redone on the next open (``meta.dirty``).

**Audit.** Every request (train, compose, forget, verify) appends a ``started`` row and, in the same transaction as
its manifest changes, an ``ok`` row (or an ``error`` row); rows are never updated or deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from taft.checkpoint import fsync_dir, fsync_file
from taft.errors import TaftError
from taft.train.rundir import remove_path

FORMAT = "taft-shards/1"
TOMBSTONE = "forgotten:"  # the id prefix of a forgotten example's row (ShardStore.tombstone)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS examples (
    id TEXT PRIMARY KEY, shard INTEGER NOT NULL, position INTEGER NOT NULL, label INTEGER NOT NULL,
    forgotten_in INTEGER);
CREATE INDEX IF NOT EXISTS examples_shard ON examples (shard);
CREATE TABLE IF NOT EXISTS shards (
    shard INTEGER PRIMARY KEY, status TEXT NOT NULL, file TEXT, sha256 TEXT, examples INTEGER NOT NULL,
    generation INTEGER NOT NULL, val_acc REAL, train_s REAL, trained_in INTEGER, ids_sha256 TEXT,
    privacy TEXT);
CREATE TABLE IF NOT EXISTS features (shard INTEGER PRIMARY KEY, file TEXT NOT NULL, sha256 TEXT NOT NULL,
    generation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (path TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, request INTEGER, time TEXT NOT NULL, action TEXT NOT NULL,
    args TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL);
"""
# shard status: "untrained" (no file yet), "live" (file in the composition), "dropped" (forgotten without
# retraining: no file), "empty" (every example forgotten: no file)


class StoreError(TaftError):
    """A store that does not exist, is damaged, or cannot take the request; the message says what to do."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ShardStore:
    """Open (``create=False``) or create a store folder. Reads need no lock; every change goes through
    :meth:`writing`, which takes the writer lock and first finishes what an interrupted writer left."""

    def __init__(self, root: str | Path, *, create: bool = False, lock_timeout: float = -1) -> None:
        self.root = Path(root).expanduser().absolute()
        db = self.root / "manifest.sqlite"
        if not create and not db.is_file():
            what = "does not exist" if not self.root.exists() else "is not a shard store (no manifest.sqlite)"
            raise StoreError(f"--store {self.root} {what}; create one with `taft shards train --store "
                             f"{self.root} --shards K ...`")
        if create:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"--store {self.root} is a file; choose a folder")
            self.root.mkdir(parents=True, exist_ok=True)
        _check_manifest_file(self.root, db, create)
        try:  # the manifest first: a folder holding it is a store, whatever else a killed creation left
            self.db = sqlite3.connect(db, isolation_level=None, timeout=60)
            self._check_tables(create)  # before anything writes to a file that may not be a store's
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{db} is damaged or not a SQLite file ({e}); the store cannot be read: restore the "
                             f"folder from a backup") from e
        (self.root / "shards").mkdir(exist_ok=True)  # (a creation killed right after the manifest lacks them)
        (self.root / "features").mkdir(exist_ok=True)
        self.lock = FileLock(str(self.root / "store.lock"), timeout=lock_timeout)
        self._request: int | None = None

    def _check_tables(self, create: bool) -> None:
        """An existing manifest is a store's: it has the store's tables and format. A creation killed before its
        tables were all made may only be started over (``create``)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        ours = {"meta", "examples", "shards", "features", "pending", "audit", "sqlite_sequence"}
        missing = {"meta", "examples", "shards", "pending", "audit"} - tables
        problem = None
        if tables - ours:
            problem = (f"is a SQLite file but not a taft shard store's manifest (it has tables "
                       f"{sorted(tables - ours)[:5]}); choose another folder for the store")
        elif missing and not create:
            problem = ("holds no complete store: its creation was interrupted before the manifest was set up; run "
                       "`taft shards train` again with the same options to create it")
        if problem:
            self.db.close()
            raise StoreError(f"{self.root / 'manifest.sqlite'} {problem}")
        if "meta" not in tables:
            return
        row = self.db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        if row is not None and json.loads(row[0]) != FORMAT:
            self.db.close()
            raise StoreError(f"{self.root} is a store of format {json.loads(row[0])!r}; this taft reads {FORMAT!r}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ShardStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- paths --------------------------------------------------------------------------------------------
    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def composed_dir(self) -> Path:
        return self.root / "composed"

    def rel(self, path: Path) -> str:
        return str(Path(path).absolute().relative_to(self.root))

    # -- transactions ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic manifest change (BEGIN IMMEDIATE … COMMIT; rolled back on any exception)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def writing(self, action: str, args: dict[str, Any]) -> Iterator[ShardStore]:
        """Hold the writer lock for one request: recover, log ``started``, run; an exception logs ``error``.
        The body ends its request with :meth:`finish` (an ``ok`` row, inside its last transaction)."""
        try:
            self.lock.acquire()
        except Timeout:
            raise StoreError(f"the store {self.root} is busy (another taft process holds {self.lock.lock_file}); "
                             f"wait for it to finish") from None
        try:
            self.recover()
            with self.transaction() as db:
                cur = db.execute("INSERT INTO audit (request, time, action, args, outcome, detail) VALUES "
                                 "(NULL, ?, ?, ?, 'started', '{}')", (now(), action, json.dumps(args, default=str)))
                self._request = cur.lastrowid
                db.execute("UPDATE audit SET request = seq WHERE seq = ?", (self._request,))
            self._action, self._args, self._finished = action, args, False
            try:
                yield self
            except BaseException as e:
                if not isinstance(e, KeyboardInterrupt | SystemExit):
                    self._log("error", {"error": f"{type(e).__name__}: {e}"})
                raise
            if not self._finished:
                self._log("ok", {})
        finally:
            self._request = None
            self.lock.release()

    def record(self, db: sqlite3.Connection, outcome: str, detail: dict[str, Any], *, args: bool = False) -> None:
        """Append one audit row of the current request inside the caller's transaction (``args``: with the
        request's arguments, as its first and last rows have)."""
        db.execute("INSERT INTO audit (request, time, action, args, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)",
                   (self._request, now(), self._action, json.dumps(self._args, default=str) if args else "{}",
                    outcome, json.dumps(detail, default=str)))

    def finish(self, db: sqlite3.Connection, detail: dict[str, Any], outcome: str = "ok") -> None:
        """Append the request's final row inside the caller's transaction (the change and its record commit
        together)."""
        self.record(db, outcome, detail, args=True)
        self._finished = True

    def _log(self, outcome: str, detail: dict[str, Any]) -> None:
        with self.transaction() as db:
            self.record(db, outcome, detail, args=True)

    @property
    def action(self) -> str:
        return self._action

    @property
    def request(self) -> int:
        assert self._request is not None, "outside a writing() request"
        return self._request

    # -- crash recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Delete every file a killed writer left pending (temporary files, files written but never committed,
        files superseded but not yet removed). Call with the lock held. Returns what was removed."""
        removed = []
        for (path,) in self.db.execute("SELECT path FROM pending").fetchall():
            p = self.root / path
            if p.exists() or p.is_symlink():
                remove_path(p)
                removed.append(path)
        # safetensors (0.8) writes a file through a `.tmpXXXXXX` sibling of its own (the Rust tempfile crate's name)
        # before renaming it: a writer killed in between leaves it, never recorded as pending
        for folder in (self.shards_dir, self.root / "features"):
            for p in sorted(folder.glob(".tmp*")) if folder.is_dir() else []:
                if _SAFETENSORS_TMP.fullmatch(p.name):
                    remove_path(p)
                    removed.append(self.rel(p))
        # a composition killed while its run folder was staged or swapped (its Δw is redone: meta.dirty)
        for p in sorted(self.root.glob(f".{self.composed_dir.name}.*")):
            if p.name.startswith((f".{self.composed_dir.name}.tmp-", f".{self.composed_dir.name}.old-")):
                remove_path(p)
                removed.append(self.rel(p))
        if removed:
            fsync_dir(self.shards_dir)
            fsync_dir(self.root)
        self.db.execute("DELETE FROM pending")
        return removed

    def add_pending(self, *paths: Path) -> None:
        """Record paths about to be written (or to be deleted), in their own committed transaction."""
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO pending (path) VALUES (?)", [(self.rel(p),) for p in paths])

    def settle(self, db: sqlite3.Connection, *paths: Path) -> None:
        """Inside a transaction: ``paths`` are now part of the store (no longer pending)."""
        db.executemany("DELETE FROM pending WHERE path = ?", [(self.rel(p),) for p in paths])

    def delete_files(self, paths: Sequence[Path]) -> None:
        """Delete files that a committed transaction listed as pending, then clear them from ``pending``."""
        for p in paths:
            remove_path(p)
        for folder in {Path(p).parent for p in paths}:
            fsync_dir(folder)
        if paths:
            with self.transaction() as db:
                self.settle(db, *paths)

    # -- meta, examples, shards ------------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    @staticmethod
    def set_meta(db: sqlite3.Connection, key: str, value: Any) -> None:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def shard_rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM shards ORDER BY shard")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def shard_row(self, shard: int) -> dict[str, Any] | None:
        rows = [r for r in self.shard_rows() if r["shard"] == shard]
        return rows[0] if rows else None

    def live_ids(self, shard: int) -> list[str]:
        """The not-forgotten example ids of ``shard``, in dataset order."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM examples WHERE shard = ? AND forgotten_in IS NULL ORDER BY position", (shard,))]

    def all_live_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT id FROM examples WHERE forgotten_in IS NULL ORDER BY position")]

    def tombstone(self, example_id: str) -> str:
        """What the manifest keeps of a forgotten example: ``forgotten:`` + HMAC-SHA256 of its id under this
        store's own random key (meta ``id_key``). It recognizes the id when asked again (``already forgotten``)
        and reveals nothing about the example to whoever lacks the key; its id, label and text are not kept."""
        key = self.get_meta("id_key")
        if key is None:
            raise StoreError("the store has no id key yet (made by an older taft); run a forget or `taft shards "
                             "verify` first")
        return TOMBSTONE + hmac.new(bytes.fromhex(key), example_id.encode(), hashlib.sha256).hexdigest()[:32]

    def ensure_id_key(self) -> None:
        """Give the store its tombstone key (at creation; older stores at their next write), and turn the ids an
        older store kept of forgotten examples into tombstones."""
        if self.get_meta("id_key") is None:
            with self.transaction() as db:
                self.set_meta(db, "id_key", secrets.token_hex(32))
        raw = [i for (i,) in self.db.execute("SELECT id FROM examples WHERE forgotten_in IS NOT NULL")
               if not i.startswith(TOMBSTONE)]
        if raw:
            with self.transaction() as db:
                db.executemany("UPDATE examples SET id = ?, label = -1 WHERE id = ?",
                               [(self.tombstone(i), i) for i in raw])

    def forgotten_ids(self) -> list[str]:
        """The tombstones of the forgotten examples (:meth:`tombstone`), in dataset order."""
        return [r[0] for r in self.db.execute(
            "SELECT id FROM examples WHERE forgotten_in IS NOT NULL ORDER BY position")]

    def origins(self) -> dict[int, dict[str, Any]]:
        """Shards that joined after the store's first training (meta ``origins``): ``{shard: {"kind": "added" |
        "imported", "request": r, "ids": disclosed?, ...}}``; a shard not listed was trained by ``train``."""
        return {int(k): v for k, v in (self.get_meta("origins") or {}).items()}

    def imported(self) -> list[int]:
        """Shards imported from another store's package (no training features here: they cannot be retrained)."""
        return sorted(k for k, o in self.origins().items() if o.get("kind") == "imported")

    def undisclosed(self) -> list[int]:
        """Imported shards whose example ids were not disclosed: only their count and digest are known, so they can
        only be dropped as a whole."""
        return sorted(k for k, o in self.origins().items() if o.get("kind") == "imported" and not o.get("ids"))

    def audit_rows(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM audit ORDER BY seq")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def shard_file(self, shard: int, generation: int) -> Path:
        return self.shards_dir / f"shard-{shard:04d}-g{generation}.safetensors"

    def feature_rows(self) -> dict[int, dict[str, Any]]:
        """``{shard: {file, sha256, generation}}``: each shard's features file (shards with live examples)."""
        cur = self.db.execute("SELECT shard, file, sha256, generation FROM features ORDER BY shard")
        return {k: {"file": f, "sha256": h, "generation": g} for k, f, h, g in cur.fetchall()}

    def feature_file(self, shard: int, generation: int) -> Path:
        return self.root / "features" / f"shard-{shard:04d}-f{generation}.safetensors"


_SQLITE_HEADER = b"SQLite format 3\x00"
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def _check_manifest_file(root: Path, db: Path, create: bool) -> None:
    """Refuse a manifest that is not a SQLite database before SQLite touches it (SQLite would take an empty file
    for a new, empty database: a truncated manifest would read as a store without shards). An empty manifest in a
    folder with no shard or features file is a creation killed before its first write: only ``create`` may
    start it over."""
    if not db.is_file():
        return
    with open(db, "rb") as f:
        head = f.read(len(_SQLITE_HEADER))
    if head == _SQLITE_HEADER:
        return
    if not head:
        files = [p for d in ("shards", "features", "composed") if (root / d).is_dir() for p in (root / d).iterdir()]
        if create and not files:
            return
        raise StoreError(f"{db} is empty (0 bytes): " + (
            "the manifest was truncated while the store holds shard files; the store cannot be read: restore "
            "manifest.sqlite from a backup (its shard files are kept)" if files else
            "the store's creation was interrupted before it began; run `taft shards train` again with the same "
            "options to create it"))
    raise StoreError(f"{db} is not a SQLite database (damaged or replaced); the store cannot be read: restore it "
                     f"from a backup")


def atomic_tmp(path: Path) -> Path:
    """The temporary sibling a file is written to before its rename (recorded as pending with it)."""
    return path.with_name(f".{path.name}.tmp")


def publish(tmp: Path, path: Path) -> None:
    """fsync ``tmp`` and rename it to ``path`` (atomic on POSIX), then fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
