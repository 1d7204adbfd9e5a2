"""Crash-consistency trials: run store requests in a child process, kill it with SIGKILL at a random moment,
then check that a reader is never served a composition holding a forgotten example (it is served the old or
the new state, or refused), that the store reopens consistent, and that no finished shard was lost.

One trial: a child process (a fresh interpreter, not a fork) creates a store and trains it, composes it with other
weights, forgets one example with ``--retrain`` and another by dropping its shard; the parent kills the child after
a random delay (uniform over the length of an uninterrupted run), then :func:`taft.shards.verify` must pass,
every shard that was live just before the kill must still be live with the same file unless a recorded forget
request superseded it, and resuming (``train_store`` again) must complete the store and verify again. A trial also
fails if a killed composition left its staging folders (``.composed.tmp-*`` / ``.composed.old-*``) behind after
the next request. Used by the tests (20 trials) and by ``benchmarks/shard_crash.py`` (100 trials).

With ``grow=(NEW_FILE, PACKAGE)`` a trial's requests are a store's growth instead: train it, add the examples of
``NEW_FILE`` (:func:`taft.shards.grow.add_data`), import ``PACKAGE`` (:func:`taft.shards.grow.import_shard`). After a
kill a grown store must hold no part of an addition (every shard beyond the first K is live: the old state or the
new one), and once resumed (train, then the add and the import that had not committed) its live shard models must be
those of the uninterrupted run, tensor for tensor.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.shards.common import ids_digest
from taft.shards.composition import compose
from taft.shards.create import train_store
from taft.shards.removal import forget
from taft.shards.store import ShardStore
from taft.shards.verification import verify


def _requests(cfg: TrainConfig, store: Path, num_shards: int, rng_seed: int,
              grow: tuple[str, str] | None = None) -> None:
    if grow:
        train_store(cfg, store, num_shards, progress=False)
        _grow(store)(*grow)
        return
    rng = random.Random(rng_seed)
    train_store(cfg, store, num_shards, progress=False)
    compose(store, weights="uniform")
    st = ShardStore(store)
    live = st.all_live_ids()
    st.close()
    a, b = rng.sample(live, 2)
    forget(store, [a], retrain=True)
    forget(store, [b])


def _grow(store: Path):
    """The growth requests that have not committed yet (a resumed trial runs only those)."""
    from taft.shards.grow import add_data, import_shard

    def run(new: str, package: str) -> None:
        with ShardStore(store) as st:
            kinds = [s["kind"] for s in st.get_meta("data_sources") or []]
        if "add" not in kinds:
            add_data(store, new)
        if "import" not in kinds:
            import_shard(store, package)

    return run


def _grow_problem(store: Path, num_shards: int) -> str | None:
    """A grown store holds a whole addition or none of it: every shard beyond the first K is live."""
    with ShardStore(store) as st:
        extra = [r for r in st.shard_rows() if r["shard"] >= num_shards]
        sources = st.get_meta("data_sources") or []
        imported = set(st.imported())
    partial = [r["shard"] for r in extra if r["status"] != "live"]
    if partial:
        return f"shards {partial} of an addition are not live: part of a request was committed"
    if sum(s.get("examples", 0) for s in sources if s["kind"] == "add") != sum(
            r["examples"] for r in extra if r["shard"] not in imported):
        return "the added examples and the added shards disagree"
    return None


def _same_models(a: Path, b: Path) -> bool:
    """The live shards of two stores are the same models, tensor for tensor (bitwise)."""
    from taft.checkpoint import read_delta

    with ShardStore(a) as sa, ShardStore(b) as sb:
        ra = {r["shard"]: a / r["file"] for r in sa.shard_rows() if r["status"] == "live"}
        rb = {r["shard"]: b / r["file"] for r in sb.shard_rows() if r["status"] == "live"}
    if set(ra) != set(rb):
        return False
    for k in ra:
        x, y = read_delta(ra[k])[0], read_delta(rb[k])[0]
        if set(x) != set(y) or any(not torch.equal(x[n], y[n]) for n in x):
            return False
    return True


def _live(store: Path) -> dict[int, str]:
    db = store / "manifest.sqlite"
    if not db.is_file():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(con.execute("SELECT shard, sha256 FROM shards WHERE status = 'live'").fetchall())
    except sqlite3.OperationalError:  # no table yet
        return {}
    finally:
        con.close()


def _superseded(store: Path) -> set[int]:
    """Shards touched by a forget request (their old model may rightly be gone)."""
    st = ShardStore(store)
    try:
        out: set[int] = set()
        for a in st.audit_rows():
            if a["outcome"] == "forgotten":
                out.update(json.loads(a["detail"])["shards"])
        return out
    finally:
        st.close()


def _served_problem(store: Path) -> str | None:
    """What a reader would be served right after the kill, before anyone repairs the store: if ``composed/`` is
    readable (``taft eval STORE/composed`` checks it with :func:`verify_run`), it must equal the composition of its
    shards' current files, each of them live and trained on exactly its shard's live examples — so it holds no
    example a committed forget removed. None when that holds or the reader is refused."""
    from taft.checkpoint import read_delta
    from taft.delta import weighted_average
    from taft.train.rundir import RunDirError, verify_run

    if not (store / "manifest.sqlite").is_file():
        return None
    try:
        manifest = verify_run(store / "composed")
    except RunDirError:
        return None  # refused
    st = ShardStore(store)
    try:
        info = manifest.get("composed") or {}
        deltas = []
        for k in info.get("shards", []):
            row = st.shard_row(k)
            if row is None or row["status"] != "live" or row["ids_sha256"] != ids_digest(st.live_ids(k)):
                return f"composed/ is served with shard {k}, which is no longer a live model of its live examples"
            deltas.append(read_delta(store / row["file"])[0])
        composed = read_delta(store / "composed" / "delta.safetensors")[0]
        fresh = weighted_average(deltas, info["weights"])
        if any(not torch.equal(fresh[n], composed[n]) for n in fresh):
            return "composed/ is served but differs from the composition of its shards' current files"
        return None
    finally:
        st.close()


def _spawn(store: Path, cfg_json: str, num_shards: int, seed: int,
           grow: tuple[str, str] | None = None) -> subprocess.Popen:
    """A fresh interpreter runs the requests (no fork: a forked child would inherit thread pools and locks); it
    prints ``ready`` once its imports are done, so the kill delay measures the requests alone."""
    proc = subprocess.Popen([sys.executable, "-m", "taft.shards.chaos", "--child", str(store), cfg_json,
                             str(num_shards), str(seed), *(grow or ())], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError("the chaos child did not start (see its stderr above)")
    return proc


def run_trials(work: str | Path, cfg: TrainConfig, *, num_shards: int = 3, trials: int = 20, seed: int = 0,
               resume: bool = True, grow: tuple[str, str] | None = None) -> dict:
    """``trials`` kill -9 trials under ``work``; returns counts and any failure (a failure is a bug)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(dataclasses.asdict(cfg))
    rng = random.Random(seed)
    runs = []
    for r in range(2):  # uninterrupted runs: the faster one's length (a burst of load elsewhere inflates one run)
        ref = _spawn(work / f"reference-{r}", cfg_json, num_shards, seed, grow)
        t0 = time.perf_counter()
        if ref.wait() != 0:
            raise RuntimeError("the uninterrupted reference run failed (see its stderr above)")
        runs.append(time.perf_counter() - t0)
    length = min(runs)
    failures, killed_in = [], []
    for t in range(trials):
        store = work / f"trial-{t}"
        proc = _spawn(store, cfg_json, num_shards, seed + t, grow)
        delay = rng.uniform(0.0, length)
        time.sleep(delay)
        before = _live(store)
        proc.kill()  # SIGKILL: no atexit, no finalizers
        code = proc.wait()  # negative: killed by the signal; 0: it had finished; positive: the requests raised
        killed_in.append(None if code >= 0 else round(delay / length, 3))
        if code > 0:
            failures.append({"trial": t, "delay_s": delay, "error": f"the requests exited with {code} before the "
                                                                    f"kill (their traceback is on stderr)"})
            continue
        try:
            served = _served_problem(store)
            if served:
                failures.append({"trial": t, "delay_s": delay, "served": served})
                continue
            report = verify(store) if (store / "manifest.sqlite").is_file() else {"incomplete": True}
            if report.get("incomplete"):  # killed before the store was created: the old state is "no store"
                report = {"ok": not before, "problems": [] if not before else ["live shards but no config"]}
            after = _live(store)
            lost = [k for k, sha in before.items() if after.get(k) != sha and k not in _superseded(store)]
            leftovers = sorted(p.name for p in store.glob(".*") if p.name.startswith(".composed.")) \
                if store.is_dir() else []
            partial = _grow_problem(store, num_shards) if grow and report.get("checked") else None
            if not report["ok"] or lost or leftovers or partial:
                failures.append({"trial": t, "delay_s": delay, "problems": report["problems"], "lost": lost,
                                 "leftovers": leftovers, "partial": partial})
                continue
            if resume:
                train_store(cfg, store, num_shards, progress=False)
                if grow:
                    _grow(store)(*grow)
                again = verify(store)
                if not again["ok"]:
                    failures.append({"trial": t, "delay_s": delay, "after_resume": again["problems"]})
                elif grow and not _same_models(store, work / "reference-0"):
                    failures.append({"trial": t, "delay_s": delay, "after_resume": "its live shard models differ "
                                                                                   "from the uninterrupted run's"})
        except Exception as e:  # noqa: BLE001 (a failed trial is reported, not raised)
            failures.append({"trial": t, "delay_s": delay, "error": f"{type(e).__name__}: {e}"})
    return {"trials": trials, "killed": sum(k is not None for k in killed_in), "failures": failures,
            "uninterrupted_s": length, "kill_points": killed_in}


def main(argv: list[str] | None = None) -> int:
    """``python -m taft.shards.chaos WORK CONFIG_JSON TRIALS SEED [NEW_FILE PACKAGE]``: the trials, printed as JSON.
    (``--child STORE CONFIG_JSON SHARDS SEED`` is one trial's requests, run by :func:`run_trials`.)"""
    from taft.config import from_dict

    args = argv if argv is not None else sys.argv[1:]
    if args[0] == "--child":
        store, cfg_json, num_shards, seed, *grow = args[1:]
        torch.set_num_threads(1)
        cfg = from_dict(TrainConfig, json.loads(cfg_json))
        print("ready", flush=True)
        _requests(cfg, Path(store), int(num_shards), int(seed), tuple(grow) or None)
        return 0
    work, cfg_json, trials, seed, *grow = args
    # a hang is a bug too: after TAFT_CHAOS_WATCHDOG seconds print every thread's stack and exit
    faulthandler.dump_traceback_later(float(os.environ.get("TAFT_CHAOS_WATCHDOG", 540)), exit=True)
    torch.set_num_threads(1)
    res = run_trials(work, from_dict(TrainConfig, json.loads(cfg_json)), trials=int(trials), seed=int(seed),
                     grow=tuple(grow) or None)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
