"""Stores that grow: data arriving in chunks, composed TAFT grown by `taft shards add` vs retraining one model on
everything so far vs Model Soup and SISA grown the same way.

    python benchmarks/shards_grow.py --tasks trec              # resumable (a JSONL per task; stores in --work)
    python benchmarks/shards_grow.py --report --tasks trec        # markdown + JSON + plot from the JSONL
    python benchmarks/shards_grow.py --small                      # tiny random model on a toy task (smoke test)

Protocol, per task: 10% of the training file (seeded) is set aside, the rest (optionally capped by --max-train) is
cut into --chunks equal chunks in a seeded order. Chunk 1 creates each store with --shards shards; every later chunk is
added with `add_data` (new shards of the store's mean shard size). A registered task (trec, sst2, …) carves its
validation split from the training data it is given, so a store's validation split is 10% of chunk 1 (its own,
fixed as it grows), and each `retrain all` carves 10% of all chunks so far (it trains on 90% of them). The test file
is the task's. After each chunk:

* **TAFT (composed)**: the tangent store (`method=taft`), its composition's test accuracy;
* **Model Soup** / **SISA (vote)**: the ordinary fine-tuning store (`method=nlft`) grown the same way, the
  composition of its shards and their majority vote;
* **retrain all (TAFT, K=1)**: one tangent model trained from scratch on every chunk so far (a new store with 1
  shard: the same code path, features and w0).

Times are wall-clock seconds of the whole call (loading w0, computing the new chunk's features, training, composing;
`retrain` likewise over all data so far). Inference: one forward pass over the test features with the composed Δw
vs with every live shard (the ensemble the composition equals), after each chunk.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.shards import ShardStore, train_store
from taft.shards.grow import add_data
from taft.shards.report import shard_logits
from taft.shards.training import accuracy, vote_counts
from taft.train.rundir import write_json

sys.path.insert(0, str(Path(__file__).parent))
from shards import append_row, read_rows  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sentence-tasks"
METHODS = {"taft": "TAFT (composed)", "nlft": "Model Soup"}


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_bytes().decode("utf-8", errors="replace").splitlines() if line.strip()]


def prepare(args, task: str, work: Path) -> tuple[Path, list[Path], Path]:
    """Write the base folder (chunk 1 as train, the fixed dev split, the test file) and the later chunk files."""
    if args.small:
        lines = [f"{i % 3} sentence number {i} is {['bad', 'fine', 'good'][i % 3]} {'very ' * (i % 4)}indeed"
                 for i in range(150)]
        test = [f"{i % 3} held out line {i} is {['bad', 'fine', 'good'][i % 3]} {'very ' * (i % 4)}indeed"
                for i in range(30)]
    else:
        lines = _lines(Path(args.data_root) / f"{task}.train.txt")
        test = _lines(Path(args.data_root) / f"{task}.test.txt")
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    n_dev = round(0.1 * len(lines))
    dev = [lines[i] for i in sorted(order[:n_dev])]
    train = [lines[i] for i in order[n_dev:]]
    if args.max_train:
        train = train[: args.max_train]
    size = len(train) // args.chunks
    chunks = [train[c * size: (c + 1) * size] for c in range(args.chunks)]
    base = work / "data" / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name, rows in ((f"{task}.train.txt", chunks[0]), (f"{task}.dev.txt", dev), (f"{task}.test.txt", test)):
        (base / name).write_text("\n".join(rows) + "\n")
    files = []
    for c, rows in enumerate(chunks):
        files.append(work / "data" / f"chunk-{c + 1}.txt")
        files[-1].write_text("\n".join(rows) + "\n")
    return base, files, work / "data"


def config(args, data: Path, method: str, task: str) -> TrainConfig:
    return TrainConfig(model=args.model, data=str(data), method=method, head_init=args.head_init, epochs=args.epochs,
                       min_steps=args.min_steps, lr=args.lr, seed=0, threads=args.threads)


def evaluate(store: Path) -> dict:
    t0 = time.perf_counter()
    composed, labels, _ = shard_logits(store, "test", which="composed")
    t_composed = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_shard, _, shards = shard_logits(store, "test")
    t_shards = time.perf_counter() - t0
    with ShardStore(store) as st:
        info = st.get_meta("composed")
    w = torch.tensor(info["weights"])
    ensemble = (w[:, None, None] * per_shard).sum(0) / w.sum()
    return {"composed": accuracy(composed[0], labels), "ensemble": accuracy(ensemble, labels),
            "vote": accuracy(vote_counts(per_shard), labels),
            "live_shards": len(shards), "composed_infer_s": t_composed, "ensemble_infer_s": t_shards,
            "composed_equals_ensemble_argmax": bool((composed[0].argmax(-1) == ensemble.argmax(-1)).all())}


def run_task(args, task: str) -> None:
    work = Path(args.work) / task
    out = Path(args.out) / "shards_grow"
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{task}.jsonl"
    done = {(r["method"], r["chunk"]) for r in read_rows(log)}
    base, chunks, data_dir = prepare(args, task, work)
    for c in range(1, len(chunks) + 1):
        for method in ("taft", "nlft", "retrain"):
            if (method, c) in done:
                continue
            row = {"task": task, "method": method, "chunk": c, "date": datetime.date.today().isoformat()}
            if method == "retrain":
                folder = data_dir / f"upto-{c}"
                shutil.rmtree(folder, ignore_errors=True)
                shutil.copytree(base, folder)
                (folder / f"{task}.train.txt").write_text("".join(p.read_text() for p in chunks[:c]))
                store = work / f"retrain-{c}"
                shutil.rmtree(store, ignore_errors=True)
                t0 = time.perf_counter()
                train_store(config(args, folder, "taft", task), store, 1, progress=False)
                row["time_s"] = time.perf_counter() - t0
            else:
                store = work / f"store-{method}"
                t0 = time.perf_counter()
                if c == 1:
                    shutil.rmtree(store, ignore_errors=True)
                    train_store(config(args, base, method, task), store, args.shards, progress=False)
                else:
                    with ShardStore(store) as st:
                        sources = st.get_meta("data_sources") or []
                    if not any(s.get("data") == str(chunks[c - 1].absolute()) for s in sources):  # resumed
                        add_data(store, chunks[c - 1])
                row["time_s"] = time.perf_counter() - t0
            with ShardStore(store) as st:
                row["examples"] = len(st.all_live_ids())
            row.update(evaluate(store))
            if method != "retrain":
                from taft.shards import verify

                row["verify_ok"] = verify(store)["ok"]
            print(json.dumps(row), flush=True)
            append_row(log, row)


def report(args, tasks: list[str]) -> None:
    out = Path(args.out)
    suffix = "-small" if args.small else ""
    summary, md = {}, []
    for task in tasks:
        rows = read_rows(out / "shards_grow" / f"{task}.jsonl")
        by = {(r["method"], r["chunk"]): r for r in rows}
        chunks = sorted({r["chunk"] for r in rows})
        table = {"chunks": chunks,
                 "examples": [by[("taft", c)]["examples"] for c in chunks],
                 "TAFT (composed)": [by[("taft", c)]["composed"] for c in chunks],
                 "Model Soup": [by[("nlft", c)]["composed"] for c in chunks],
                 "SISA (vote)": [by[("nlft", c)]["vote"] for c in chunks],
                 "retrain all (TAFT, K=1)": [by[("retrain", c)]["composed"] for c in chunks],
                 "time_s": {m: [by[(m, c)]["time_s"] for c in chunks] for m in ("taft", "nlft", "retrain")},
                 "live_shards": [by[("taft", c)]["live_shards"] for c in chunks],
                 "composed_infer_s": [by[("taft", c)]["composed_infer_s"] for c in chunks],
                 "ensemble_infer_s": [by[("taft", c)]["ensemble_infer_s"] for c in chunks],
                 "composed_equals_ensemble": all(by[("taft", c)]["composed_equals_ensemble_argmax"] for c in chunks),
                 "verify_ok": all(by[(m, c)]["verify_ok"] for m in ("taft", "nlft") for c in chunks),
                 "rows": rows}
        summary[task] = table
        md += [f"### {task}: test accuracy (%) after each chunk", "",
               "| chunk | examples | live shards | TAFT (composed) | Model Soup | SISA (vote) "
               "| retrain all (TAFT, K=1) |"
               " time: TAFT add | Soup/SISA add | retrain all | composed infer | ensemble infer |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, c in enumerate(chunks):
            md.append(f"| {c} | {table['examples'][i]} | {table['live_shards'][i]} | "
                      f"{100 * table['TAFT (composed)'][i]:.1f} | {100 * table['Model Soup'][i]:.1f} | "
                      f"{100 * table['SISA (vote)'][i]:.1f} | {100 * table['retrain all (TAFT, K=1)'][i]:.1f} | "
                      f"{table['time_s']['taft'][i]:.1f} s | {table['time_s']['nlft'][i]:.1f} s | "
                      f"{table['time_s']['retrain'][i]:.1f} s | {table['composed_infer_s'][i]:.2f} s | "
                      f"{table['ensemble_infer_s'][i]:.2f} s |")
        md += ["", f"verify after every step: {table['verify_ok']}; composed argmax = ensemble argmax after every "
                   f"step: {table['composed_equals_ensemble']}", ""]
    meta = {"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(), "model": args.model,
            "epochs": args.epochs, "min_steps": args.min_steps, "shards": args.shards, "chunks": args.chunks,
            "max_train": args.max_train, "threads": args.threads, "lr": args.lr}
    write_json(out / f"shards_grow{suffix}.json", {"meta": meta, "tasks": summary})
    (out / f"shards_grow{suffix}.md").write_text(
        f"# Stores that grow (`{meta['command']}`, {meta['date']})\n\n" + "\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 * len(summary), figsize=(10 * len(summary), 3.8), squeeze=False)
    for t, (task, table) in enumerate(summary.items()):
        ax = axes[0][2 * t]
        for name in ("TAFT (composed)", "Model Soup", "SISA (vote)", "retrain all (TAFT, K=1)"):
            ax.plot(table["examples"], [100 * v for v in table[name]], marker="o", label=name)
        ax.set(title=f"{task}: test accuracy as data arrives", xlabel="training examples so far", ylabel="%")
        ax.legend(fontsize=8)
        ax = axes[0][2 * t + 1]
        for m, name in (("taft", "TAFT add"), ("nlft", "Soup/SISA add"), ("retrain", "retrain all")):
            ax.plot(table["examples"], table["time_s"][m], marker="o", label=name)
        ax.set(title=f"{task}: seconds per step", xlabel="training examples so far", ylabel="s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"shards_grow{suffix}.png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="trec")
    p.add_argument("--chunks", type=int, default=5)
    p.add_argument("--shards", type=int, default=5, help="shards of the first chunk")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--max-train", type=int, default=None, help="cap on the training examples over all chunks")
    p.add_argument("--model", default="minilm")
    p.add_argument("--head-init", default="zero-shot")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=str(DATA))
    p.add_argument("--work", default="/tmp/taft-shards-grow")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report", action="store_true")
    p.add_argument("--small", action="store_true", help="tiny random model on a toy task (smoke test)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.small:
        args.model, args.head_init, args.tasks, args.shards, args.epochs, args.min_steps = \
            "tiny-bert", "random", "toy", 2, 2, 1
        args.work = str(Path(args.out) / "work")
    tasks = args.tasks.split(",")
    if not args.report:
        for task in tasks:
            run_task(args, task)
    report(args, tasks)


if __name__ == "__main__":
    main()
