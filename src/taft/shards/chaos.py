"""Crash-consistency trials: run store requests in a child process, kill it with SIGKILL at a random moment,
then check that the store reopens consistent and that no finished shard was lost.

One trial: a forked child creates a store and trains it, composes it with other weights, forgets one example with
``--retrain`` and another by dropping its shard; the parent kills the child after a random delay (uniform over the
length of an uninterrupted run), then :func:`taft.shards.ops.verify` must pass, every shard that was live just before
the kill must still be live with the same file unless a recorded forget request superseded it, and resuming
(``train_store`` again) must complete the store and verify again. Used by the tests (20 trials) and by
``benchmarks/shard_crash.py`` (100 trials). POSIX only (fork).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.shards import ops


def _requests(cfg: TrainConfig, store: Path, num_shards: int, rng_seed: int) -> None:
    rng = random.Random(rng_seed)
    ops.train_store(cfg, store, num_shards, progress=False)
    ops.compose(store, weights="uniform")
    st = ops.ShardStore(store)
    live = st.all_live_ids()
    st.close()
    a, b = rng.sample(live, 2)
    ops.forget(store, [a], retrain=True)
    ops.forget(store, [b])


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
    st = ops.ShardStore(store)
    try:
        out: set[int] = set()
        for a in st.audit_rows():
            if a["outcome"] == "forgotten":
                out.update(json.loads(a["detail"])["shards"])
        return out
    finally:
        st.close()


def run_trials(work: str | Path, cfg: TrainConfig, *, num_shards: int = 3, trials: int = 20, seed: int = 0,
               resume: bool = True) -> dict:
    """``trials`` kill -9 trials under ``work``; returns counts and any failure (a failure is a bug)."""
    torch.set_num_threads(1)  # forked children run torch: no thread pool is shared across the fork
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    _requests(cfg, work / "reference", num_shards, seed)  # warms caches too; the length of an uninterrupted run
    length = time.perf_counter() - t0
    failures, killed_in = [], []
    for t in range(trials):
        store = work / f"trial-{t}"
        pid = os.fork()
        if pid == 0:  # child: the requests, then a hard exit (no atexit, no finalizers)
            code = 0
            try:
                _requests(cfg, store, num_shards, seed + t)
            except BaseException:
                code = 1
            os._exit(code)
        delay = rng.uniform(0.0, length)
        time.sleep(delay)
        before = _live(store)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        finished = os.WIFEXITED(status)
        killed_in.append(None if finished else round(delay / length, 3))
        try:
            report = ops.verify(store) if (store / "manifest.sqlite").is_file() else {"incomplete": True}
            if report.get("incomplete"):  # killed before the store was created: the old state is "no store"
                report = {"ok": not before, "problems": [] if not before else ["live shards but no config"]}
            after = _live(store)
            lost = [k for k, sha in before.items() if after.get(k) != sha and k not in _superseded(store)]
            if not report["ok"] or lost:
                failures.append({"trial": t, "delay_s": delay, "problems": report["problems"], "lost": lost})
                continue
            if resume:
                ops.train_store(cfg, store, num_shards, progress=False)
                again = ops.verify(store)
                if not again["ok"]:
                    failures.append({"trial": t, "delay_s": delay, "after_resume": again["problems"]})
        except Exception as e:  # noqa: BLE001 (a failed trial is reported, not raised)
            failures.append({"trial": t, "delay_s": delay, "error": f"{type(e).__name__}: {e}"})
    return {"trials": trials, "killed": sum(k is not None for k in killed_in), "failures": failures,
            "uninterrupted_s": length, "kill_points": killed_in}


def main(argv: list[str] | None = None) -> int:
    """``python -m taft.shards.chaos WORK CONFIG_JSON TRIALS SEED``: the trials in a fresh process (a process that
    has started Ray or other thread pools must not fork); prints the result as JSON."""
    import sys

    from taft.config import from_dict

    work, cfg_json, trials, seed = argv if argv is not None else sys.argv[1:]
    res = run_trials(work, from_dict(TrainConfig, json.loads(cfg_json)), trials=int(trials), seed=int(seed))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
