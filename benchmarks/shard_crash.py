"""kill -9 at random points of shard-store requests, many times: the store must always reopen consistent.

    python benchmarks/shard_crash.py                 # 100 trials -> benchmarks/results/shard_crash.{json,md}
    python benchmarks/shard_crash.py --trials 20     # (the test suite runs 20)

Each trial (``taft.shards.chaos``): a child process creates and trains a 3-shard store (tiny random BERT, a
generated 3-class task), recomposes it, forgets one example with --retrain and another by dropping its shard; it
is killed with SIGKILL after a random delay uniform over an uninterrupted run's length. Then ``verify`` must pass,
no shard that was live before the kill may be lost (unless a recorded forget superseded it), and resuming the
training must complete the store and verify again.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

from taft.config import TrainConfig
from taft.shards.chaos import run_trials
from taft.train.rundir import write_json

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="taft-crash-"))
    lines = [f"{i % 3} sentence number {i} is {['bad', 'fine', 'good'][i % 3]}" for i in range(90)]
    (work / "d.txt").write_text("\n".join(lines) + "\n")
    (work / "t.txt").write_text("\n".join(lines[:24]) + "\n")
    cfg = TrainConfig(model="tiny-bert", data=str(work / "d.txt"), test_file=str(work / "t.txt"), head_init="random",
                      epochs=1, batch_size=8, lr=1e-2, max_train=45, threads=1)
    t0 = time.perf_counter()
    res = run_trials(work / "trials", cfg, trials=args.trials, seed=args.seed)
    res.update(wall_s=time.perf_counter() - t0, config=dataclasses.asdict(cfg), device=platform.machine(),
               date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               command="python benchmarks/shard_crash.py " + " ".join(sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "shard_crash.json", res)
    points = sorted(k for k in res["kill_points"] if k is not None)
    md = [f"# Shard store under kill -9 ({res['date']})", "", f"Command: `{res['command']}`", "",
          f"{res['trials']} trials, {res['killed']} killed mid-run (kill points spread over "
          f"{points[0]:.2f}–{points[-1]:.2f} of an uninterrupted run of {res['uninterrupted_s']:.2f} s), "
          f"**{len(res['failures'])} failures** (verify failed, a finished shard lost, or resume failed).", ""]
    md += [f"- trial {f['trial']}: {f}" for f in res["failures"]]
    (args.out / "shard_crash.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(1 if res["failures"] else 0)


if __name__ == "__main__":
    main()
