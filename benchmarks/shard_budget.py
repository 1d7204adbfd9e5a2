"""How long should a small shard train? Validation accuracy against the shards' step budget (``min_steps``).

    python benchmarks/shard_budget.py --tasks trec,sst2       # → results/shard_budget.{json,md}

At K = 50 a shard of TREC holds about 100 examples: 5 epochs are 20 optimizer steps. This trains the first
``--shards`` shards of the K-shard split (the store's seeded split) at each ``min_steps`` for TAFT and for ordinary
fine-tuning, and scores on the **validation split only**: the mean accuracy of the shard models, their composition
(size-weighted average of Δw) and their majority vote. It is a proxy for the K-shard composition (a few shards, not
all K), cheap enough to compare budgets; the default budget of ``taft shards train`` is chosen from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.data.shards import shard_jobs
from taft.shards.training import ShardTrainer
from taft.train.rundir import write_json

sys.path.insert(0, str(Path(__file__).parent))
from shards import _device, train_and_validate, utc_now  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def run(args) -> dict:
    command = "python benchmarks/shard_budget.py " + " ".join(sys.argv[1:])
    out: dict = {"meta": {"device": _device(), "date": utc_now(), "torch": torch.__version__, "command": command,
                          "K": args.k, "shards": args.shards, "lr": args.lr}, "tasks": {}}
    for task in args.tasks:
        cfg = TrainConfig(model=args.model, data=task, data_root=args.data_root, head_init=args.head_init,
                          test_file=args.test_file, seed=0, threads=args.threads, lr=args.lr)
        base = ShardTrainer.from_config(cfg)
        jobs = shard_jobs(list(base.features.ids), args.k, 0)[: args.shards]
        sizes = [float(len(i)) for _, i in jobs]
        rows = []
        for min_steps in args.min_steps:
            for method in ("taft", "nlft"):
                c = dataclasses.replace(cfg, method=method, min_steps=min_steps)
                _, secs, val = train_and_validate(base, c, jobs)
                row = {"min_steps": min_steps, "method": method, "steps": c.epochs_for(int(min(sizes))) *
                       -(-int(min(sizes)) // c.batch_size), "train_s": secs, "val_shard_mean": val["shard_mean"],
                       "val_composed": val["composed"], "val_vote": val["vote"]}
                rows.append(row)
                print(json.dumps({"task": task, **row}), flush=True)
        out["tasks"][task] = {"shard_sizes": sizes, "rows": rows}
    return out


def report(res: dict, path: Path) -> None:
    m = res["meta"]
    lines = ["# Shard budget: validation accuracy vs min_steps", "",
             f"`{m['command']}` ({m['device']}, {m['date']}). The first {m['shards']} shards of the K = {m['K']} "
             f"split, lr {m['lr']:g}, 5 epochs raised to reach min_steps; validation split only (%).", ""]
    for task, r in res["tasks"].items():
        lines += [f"## {task} (shards of {int(min(r['shard_sizes']))}–{int(max(r['shard_sizes']))} examples)", "",
                  "| min_steps | steps (smallest shard) | method | shard models (mean) | composed | vote | train s |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['min_steps']} | {row['steps']} | {row['method']} | {100 * row['val_shard_mean']:.1f} "
                         f"| {100 * row['val_composed']:.1f} | {100 * row['val_vote']:.1f} | {row['train_s']:.0f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="trec,sst2")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--shards", type=int, default=5, help="how many of the K shards to train")
    p.add_argument("--min-steps", default="none,50,100,200")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    args.head_init, args.test_file = "zero-shot", None
    args.tasks = args.tasks.split(",")
    args.min_steps = [None if s == "none" else int(s) for s in args.min_steps.split(",")]
    res = run(args)
    write_json(args.out / "shard_budget.json", res)
    report(res, args.out / "shard_budget.md")


if __name__ == "__main__":
    main()
