"""Which learning rate should ``taft shards train`` use by default? Chosen on validation, the same grid per method.

    python benchmarks/shard_defaults.py --threads 1           # → results/shard_defaults.{json,md}
    python benchmarks/shard_defaults.py --report              # the report from the rows written so far

For each task (TREC, SST-2, MR), each store size and each method (TAFT: composed TAFT; NLFT: Model Soup and
SISA's shards), every learning rate of the grid trains the shards from the store's defaults (zero-shot head,
``min_steps`` 100, seed 0) and scores them on the **validation split only**: the composed model (TAFT, Model Soup)
and the majority vote (SISA). A size K above ``--proxy-above`` trains only the first ``--proxy-shards`` shards of
the K-shard split (the shards a K-shard store trains, too few of them to be the K-shard model: a proxy for how a
shard of that size learns, cheap enough for a grid). A method's default is the learning rate with the best validation
accuracy averaged over every task and size (ties: the smaller rate). The test split is never read.

Rows are appended to ``results/shard_defaults/rows.jsonl`` as they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

from taft.config import TrainConfig
from taft.data.shards import shard_jobs
from taft.shards.training import ShardTrainer
from taft.train.rundir import write_json

sys.path.insert(0, str(Path(__file__).parent))
from shards import _device, append_row, read_rows, train_and_validate, utc_now  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RULES = {"taft": {"TAFT (composed)": "composed"}, "nlft": {"Model Soup": "composed", "SISA (vote)": "vote"}}


def run(args, log: Path, command: str) -> None:
    done = {(r["task"], r["K"], r["method"], r["lr"]) for r in read_rows(log)}
    for task in args.tasks:
        todo = [(k, m, lr) for k in args.ks for m in args.methods for lr in args.lrs
                if (_name(task, args), k, m, lr) not in done]
        if not todo:
            continue
        cfg = TrainConfig(model=args.model, data=task, head_init=args.head_init, test_file=args.test_file,
                          min_steps=args.min_steps, epochs=args.epochs, seed=0, threads=args.threads)
        base = ShardTrainer.from_config(cfg)
        for k, method, lr in todo:
            jobs = shard_jobs(list(base.features.ids), k, cfg.seed)
            if k > args.proxy_above:
                jobs = jobs[: args.proxy_shards]
            _, secs, val = train_and_validate(base, dataclasses.replace(cfg, method=method, lr=lr), jobs)
            row = {"task": _name(task, args), "K": k, "shards_trained": len(jobs), "method": method, "lr": lr,
                   "val": val,
                   "train_s": secs, "device": _device(), "command": command,
                   "date": utc_now()}
            append_row(log, row)
            print(json.dumps(row), flush=True)


def _name(task: str, args) -> str:
    return Path(task).stem if args.small else task


def choose(rows: list[dict]) -> dict:
    """Per method and rule: mean validation accuracy of each lr over every (task, K) cell that has all the lrs;
    the argmax (ties: the smaller lr)."""
    out = {}
    for method, rules in RULES.items():
        mine = [r for r in rows if r["method"] == method]
        lrs = sorted({r["lr"] for r in mine})
        cells = sorted({(r["task"], r["K"]) for r in mine})
        full = [c for c in cells if {r["lr"] for r in mine if (r["task"], r["K"]) == c} == set(lrs)]
        for name, rule in rules.items():
            means = {lr: statistics.fmean(r["val"][rule] for r in mine if r["lr"] == lr and (r["task"], r["K"]) in full)
                     for lr in lrs} if full else {}
            best = max(lrs, key=lambda lr: (means[lr], -lr)) if means else None
            out[name] = {"method": method, "rule": rule, "cells": [f"{t} K={k}" for t, k in full], "mean_val": means,
                         "chosen_lr": best}
    return out


def report(log: Path, out: Path, stem: str, command: str) -> None:
    rows = read_rows(log)
    chosen = choose(rows)
    commands = list(dict.fromkeys(r.get("command", "(not recorded)") for r in rows))
    meta = {"command": command, "row_commands": commands, "devices": sorted({r["device"] for r in rows}),
            "dates": sorted({r["date"][:10] for r in rows}), "rows": len(rows)}
    write_json(out / f"{stem}.json", {"meta": meta, "chosen": chosen, "rows": rows})
    lines = ["# Default learning rate of `taft shards train`, chosen on validation", "",
             f"Report: `{command}` ({', '.join(meta['devices'])}; {', '.join(meta['dates'])}). The rows came from "
             + "; ".join(f"`{c}`" for c in commands) + ". Store defaults (zero-shot head, "
             "min_steps 100, seed 0); validation split only (%). K = 50 rows train the first shards of the 50-shard "
             "split (a proxy: the rows say how many shards were trained).", "",
             "| task | K (shards trained) | method | lr | composed | vote | shard models (mean) | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["K"], r["method"], r["lr"])):
        v = r["val"]
        lines.append(f"| {r['task']} | {r['K']} ({r['shards_trained']}) | {r['method']} | {r['lr']:g} | "
                     f"{100 * v['composed']:.1f} | {100 * v['vote']:.1f} | {100 * v['shard_mean']:.1f} | "
                     f"{r['train_s']:.0f} |")
    lines += ["", "Mean validation accuracy over the cells that have every lr, and the chosen default:", "",
              "| used as | rule | " + " | ".join(f"lr {lr:g}" for lr in sorted({r["lr"] for r in rows})) +
              " | chosen |", "|---|---|" + "---|" * (len({r["lr"] for r in rows}) + 1)]
    for name, c in chosen.items():
        vals = " | ".join(f"{100 * c['mean_val'][lr]:.2f}" if lr in c["mean_val"] else "–"
                          for lr in sorted({r["lr"] for r in rows}))
        pick = "–" if c["chosen_lr"] is None else f"**{c['chosen_lr']:g}**"
        lines.append(f"| {name} | {c['rule']} | {vals} | {pick} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="trec,sst2,mr")
    p.add_argument("--ks", default="10,50")
    p.add_argument("--methods", default="taft,nlft")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--proxy-shards", type=int, default=10, help="K above --proxy-above: train this many shards")
    p.add_argument("--proxy-above", type=int, default=10)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="only write the report from the rows so far")
    p.add_argument("--small", action="store_true", help="tiny random model on a generated task (CI smoke test)")
    args = p.parse_args()
    command = "python benchmarks/shard_defaults.py " + " ".join(sys.argv[1:])
    args.head_init, args.test_file = "zero-shot", None
    args.tasks, args.methods = args.tasks.split(","), args.methods.split(",")
    args.ks = [int(k) for k in args.ks.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    stem = "shard_defaults"
    if args.small:
        work = Path(tempfile.mkdtemp(prefix="taft-shard-defaults-"))
        lines = [f"{i % 3} sentence {i} is {['bad', 'fine', 'good'][i % 3]}" for i in range(120)]
        (work / "d.txt").write_text("\n".join(lines) + "\n")
        (work / "d.test.txt").write_text("\n".join(lines[:30]) + "\n")
        args.model, args.ks, args.lrs, args.min_steps, args.epochs = "tiny-bert", [2, 6], [1e-3, 1e-2], 4, 1
        args.proxy_above, args.proxy_shards, stem = 2, 2, "shard_defaults-small"
        args.head_init, args.test_file, args.tasks = "random", str(work / "d.test.txt"), [str(work / "d.txt")]
    log = args.out / stem / "rows.jsonl"
    if not args.report:
        run(args, log, command)
    report(log, args.out, stem, command)


if __name__ == "__main__":
    main()
