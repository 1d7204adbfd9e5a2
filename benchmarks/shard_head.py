"""Levers for composed TAFT, each given to every method: a head fitted on *validation* examples, or the loss
(exploratory, validation only).

    python benchmarks/shard_head.py --threads 1                 # → results/shard_head.{json,md}
    python benchmarks/shard_head.py --variants zero-shot,ce --tasks trec --threads 1
    python benchmarks/shard_head.py --report

A store's w0 must not depend on its training examples (a forget would leave them in every shard's starting point),
so stores start from the zero-shot head. Validation examples are never training examples: a linear probe fitted
on them is as forgettable-safe as the class names. This measures what that head is worth to each method.

The validation split is cut in two halves by a seeded permutation: the probe is fitted on half A (the library's
probe: 30 epochs, lr 1e-2, on the frozen features), every model is scored on half B only. For each task, store
size K (proxies: the first ``--proxy-shards`` shards of the K-shard split, as in ``shard_defaults.py``), method,
head (zero-shot, or the half-A probe) and learning rate of the grid, the shards train from that w0 with the store
defaults (``min_steps`` 100, seed 0) and are scored on half B: composed (TAFT, Model Soup) and vote (SISA). The
test split is never read. Other variants (``--variants``) start from the zero-shot head and change one option for
every method: ``ce`` (cross-entropy instead of the rescaled square loss), ``rsl-m5`` (the rescaled square loss's
target M = 5 instead of 15), ``last2`` (the last two blocks linearized / fine-tuned instead of one: its own prefix
features). Rows go to ``results/shard_head/rows.jsonl`` as they finish (resumable).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.data.shards import shard_jobs
from taft.shards.training import ShardTrainer
from taft.train.baselines import make_tangent_model, probe_head
from taft.train.rundir import write_json

sys.path.insert(0, str(Path(__file__).parent))
from shards import _device, append_row, read_rows, train_and_validate, utc_now  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"zero-shot": {}, "val-probe": {}, "ce": {"loss": "ce"}, "rsl-m5": {"rsl_m": 5.0},
            "last2": {"scope": "last:2"}}
RULES = {"taft": {"TAFT (composed)": "composed"}, "nlft": {"Model Soup": "composed", "SISA (vote)": "vote"}}


def halves(base: ShardTrainer, seed: int) -> tuple[list[str], list[str]]:
    """The validation ids cut in two by a seeded permutation: (probe half A, scoring half B)."""
    ids = list(base.val_features.ids)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(ids) // 2
    return [ids[i] for i in sorted(perm[:cut])], [ids[i] for i in sorted(perm[cut:])]


def with_head(base: ShardTrainer, head: str, a: list[str], b: list[str]) -> ShardTrainer:  # head: a variant
    """A trainer from ``base``'s w0 with the given starting head, validating on half B only."""
    pos = {i: n for n, i in enumerate(base.val_features.ids)}
    clf = base.clf
    if head == "val-probe":
        import copy

        clf = copy.deepcopy(base.clf)
        fc = make_tangent_model(dataclasses.replace(base.cfg, method="fc"), clf).eval()
        feats = base.val_features.subset(a).advance(fc, base.template.start, batch_size=base.cfg.eval_batch_size)
        probe_head(base.cfg, clf, feats, base.val_labels[[pos[i] for i in a]], "cpu")
    return ShardTrainer(base.cfg, clf, base.features, base.labels, val_features=base.val_features.subset(b),
                        val_labels=base.val_labels[[pos[i] for i in b]])


def run(args, log: Path, command: str) -> None:
    done = {(r["task"], r["K"], r["method"], r["head"], r["lr"]) for r in read_rows(log)}
    for task in args.tasks:
        name = Path(task).stem if args.small else task
        todo = [(k, m, h, lr) for k in args.ks for h in args.heads for m in args.methods for lr in args.lrs
                if (name, k, m, h, lr) not in done]
        if not todo:
            continue
        cfg = TrainConfig(model=args.model, data=task, head_init=args.head_init, test_file=args.test_file,
                          min_steps=args.min_steps, epochs=args.epochs, seed=0, threads=args.threads)
        base = ShardTrainer.from_config(cfg)
        a, b = halves(base, args.split_seed)
        trainers = {}
        for h in dict.fromkeys(h for _, _, h, _ in todo):  # a variant with a scope of its own: its own features
            scope = VARIANTS[h].get("scope")
            own = base if scope is None else ShardTrainer.from_config(dataclasses.replace(cfg, scope=scope))
            trainers[h] = with_head(own, h, a, b)
        for k, method, head, lr in todo:
            jobs = shard_jobs(list(base.features.ids), k, cfg.seed)[: args.proxy_shards]
            scfg = dataclasses.replace(cfg, method=method, lr=lr, **VARIANTS[head])
            assert trainers[head].cfg.scope == scfg.scope, (head, trainers[head].cfg.scope)  # features of that scope
            _, secs, val = train_and_validate(trainers[head], scfg, jobs)
            row = {"task": name, "K": k, "shards_trained": len(jobs), "method": method, "head": head, "lr": lr,
                   "scope": trainers[head].cfg.scope, "val_b": val, "val_b_examples": len(b), "probe_examples": len(a),
                   "train_s": round(secs, 1), "device": _device(), "command": command,
                   "date": utc_now()}
            append_row(log, row)
            print(json.dumps(row), flush=True)


def report(log: Path, out: Path) -> str:
    rows = read_rows(log)
    devices, dates = ", ".join(sorted({r["device"] for r in rows})), ", ".join(sorted({r["date"][:10] for r in rows}))
    lines = ["# Levers for composed TAFT: a head fitted on validation half A, the loss; scored on half B (exploratory)",
             "",
             "Validation half B accuracy (%), store defaults (min_steps as each command says, 100 by default; seed "
             "0), the first shards of each K-shard split (a proxy). Variants: zero-shot head (the store default), "
             "val-probe (head probed on half A), ce (cross-entropy loss), rsl-m5 (RSL target M = 5), last2 (two "
             "blocks instead of one); all but val-probe from the zero-shot head. Each method's best lr of "
             "the grid per cell. The rows came from "
             + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
             + f" ({devices}; {dates}).",
             "",
             "| task | K | variant | TAFT (composed) | Model Soup | SISA (vote) | TAFT − best other |",
             "|---|---|---|---|---|---|---|"]
    best: dict = {}
    for r in rows:
        for name, rule in RULES[r["method"]].items():
            key = (r["task"], r["K"], r["head"], name)
            if key not in best or (r["val_b"][rule], -r["lr"]) > (best[key][0], -best[key][1]):  # ties: smaller lr
                best[key] = (r["val_b"][rule], r["lr"])
    order = list(VARIANTS)
    cells = sorted({(r["task"], r["K"], r["head"]) for r in rows}, key=lambda c: (c[0], c[1], order.index(c[2])))
    summary = []
    for task, k, head in cells:
        got = {name: best.get((task, k, head, name)) for name in ("TAFT (composed)", "Model Soup", "SISA (vote)")}
        fmt = {n: "—" if v is None else f"{100 * v[0]:.1f} (lr {v[1]:g})" for n, v in got.items()}
        gap = (100 * (got["TAFT (composed)"][0] - max(got["Model Soup"][0], got["SISA (vote)"][0]))
               if all(got.values()) else None)
        summary.append({"task": task, "K": k, "head": head, **{n: v[0] if v else None for n, v in got.items()},
                        "taft_minus_best_other": gap})
        lines.append(f"| {task} | {k} | {head} | {fmt['TAFT (composed)']} | {fmt['Model Soup']} | "
                     f"{fmt['SISA (vote)']} | {'—' if gap is None else f'{gap:+.1f}'} |")
    write_json(out / "shard_head.json", {"summary": summary, "rows": rows})
    md = "\n".join(lines) + "\n"
    (out / "shard_head.md").write_text(md)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="trec,sst2,mr")
    p.add_argument("--ks", default="10,50")
    p.add_argument("--methods", default="taft,nlft")
    p.add_argument("--variants", "--heads", dest="heads", default="zero-shot,val-probe",
                   help=f"starting head or option per row: {', '.join(VARIANTS)}")
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--proxy-shards", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--model", default="minilm")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--small", action="store_true", help="tiny random model on a generated task (CI smoke test)")
    args = p.parse_args()
    command = "python benchmarks/shard_head.py " + " ".join(sys.argv[1:])
    args.head_init, args.test_file, args.epochs = "zero-shot", None, None
    if args.small:
        work = Path(tempfile.mkdtemp(prefix="taft-shard-head-"))
        lines = [f"{(i + (i % 5 == 0)) % 3} sentence {i} is {['bad', 'fine', 'good'][i % 3]}" for i in range(150)]
        (work / "d.txt").write_text("\n".join(lines) + "\n")
        (work / "d.test.txt").write_text("\n".join(lines[:30]) + "\n")
        args.model, args.head_init, args.test_file, args.tasks = "tiny-bert", "random", str(work / "d.test.txt"), \
            str(work / "d.txt")
        args.ks, args.lrs, args.min_steps, args.epochs, args.proxy_shards = "2,6", "1e-3,1e-2", 4, 1, 2
        args.heads = ",".join(VARIANTS)
    for name in ("tasks", "methods", "heads"):
        setattr(args, name, getattr(args, name).split(","))
    unknown = [h for h in args.heads if h not in VARIANTS] + [m for m in args.methods if m not in RULES]
    if unknown:
        p.error(f"unknown variant or method {unknown}; variants: {', '.join(VARIANTS)}; methods: {', '.join(RULES)}")
    args.ks = [int(k) for k in args.ks.split(",")]
    args.lrs = [float(x) for x in args.lrs.split(",")]
    log = args.out / "shard_head" / "rows.jsonl"
    if not args.report:
        run(args, log, command)
    print(report(log, args.out))


if __name__ == "__main__":
    main()
