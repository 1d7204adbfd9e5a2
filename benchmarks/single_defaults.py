"""Which learning rate should ``taft train`` use for TAFT-1 and NLFT-1? The same grid, chosen on validation.

    python benchmarks/single_defaults.py --threads 1          # → results/single_defaults.{json,md}
    python benchmarks/single_defaults.py --report             # the report from the rows written so far

Both methods get the same learning-rate grid (default {1e-4, 3e-4, 1e-3, 3e-3}; everything else at the library defaults:
last block, probe head, 5 epochs, seed 0) on every visible task (MR, SST-2, SST-5, SUBJ, TREC). A method's
default is the rate with the best **validation** accuracy averaged over the tasks (ties: the smaller rate).

"Tasks never tuned on", measured by leaving one task out: for each task, the rate chosen on the other tasks'
validation, scored on the left-out task's test split. Test accuracy is recorded for every row but never chooses.

The chosen defaults are then scored on test at seeds 0, 1, 2 (mean ± std). Grid points that
``benchmarks/search_tasks.py`` already trained (same configuration, seed 0) are read from its per-task files
``results/search/<task>.json`` where this script has no row of its own; the report marks them. ``--main-job``
first times one ``taft train`` with the library defaults on SST-2 from a cold start (no shared feature cache):
the time before training (features, probe) and the training itself.

Rows are appended to ``results/single_defaults/rows.jsonl`` as they finish, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from taft.config import TrainConfig
from taft.train.loop import train
from taft.train.rundir import write_json

sys.path.insert(0, str(Path(__file__).parent))
from shards import _device, append_row, read_rows, utc_now  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = {"taft": "TAFT-1", "nlft": "NLFT-1"}


def _append(log: Path, row: dict) -> None:
    append_row(log, row)
    print(json.dumps(row), flush=True)


def _search_rows(task: str, results: Path) -> list[dict]:
    """The grid points ``search_tasks.py`` trained for ``task`` (seed 0): validation always, test where chosen."""
    path = results / "search" / f"{task}.json"
    if not path.is_file():
        return []
    out = []
    for method, r in json.loads(path.read_text())["methods"].items():
        if method not in METHODS:
            continue
        for c in r.get("candidates", []):
            lr = c["setting"].get("lr")
            if set(c["setting"]) != {"lr"}:
                continue
            row = {"task": task, "method": method, "lr": lr, "seed": 0, "val": c["val_acc"], "source": "search_tasks"}
            if r["chosen"] == c["setting"]:
                row["test"] = r["test_accs"][r["seeds"].index(0)]
                row["seed_tests"] = dict(zip(map(str, r["seeds"]), r["test_accs"], strict=True))
            out.append(row)
    return out


def table(args, log: Path) -> dict[tuple, dict]:
    """(task, method, lr, seed) → row; this script's rows win over search_tasks' for the same point."""
    rows: dict[tuple, dict] = {}
    for task in args.tasks:
        for r in _search_rows(task, args.results):
            if r["lr"] in args.lrs:
                rows[(task, r["method"], r["lr"], 0)] = r
                for s, acc in r.get("seed_tests", {}).items():
                    rows.setdefault((task, r["method"], r["lr"], int(s)),
                                    {**r, "seed": int(s), "test": acc, "val": None if s != "0" else r["val"]})
    for r in read_rows(log):
        if r.get("kind") == "grid" and r["task"] in args.tasks and r["lr"] in args.lrs:
            rows[(r["task"], r["method"], r["lr"], r["seed"])] = r
    return rows


def choose(rows: dict, tasks: list[str], method: str, lrs: list[float]) -> tuple[float | None, dict]:
    """The rate with the best mean validation accuracy over ``tasks`` (ties: the smaller); None if a cell is missing."""
    means = {}
    for lr in lrs:
        vals = [rows.get((t, method, lr, 0), {}).get("val") for t in tasks]
        if any(v is None for v in vals):
            return None, means
        means[lr] = statistics.fmean(vals)
    return max(sorted(lrs), key=lambda lr: (means[lr], -lr)), means


def todo(args, rows: dict) -> list[tuple[str, str, float, int]]:
    """Grid points first (validation), then the left-out tasks' test points, then the defaults' further seeds."""
    need = [(t, m, lr, 0) for t in args.tasks for m in args.methods for lr in args.lrs if (t, m, lr, 0) not in rows]
    if need:
        return need
    for m in args.methods:  # every method's left-out points before any method's further seeds
        for t in args.tasks:
            lr, _ = choose(rows, [u for u in args.tasks if u != t], m, args.lrs)
            if rows[(t, m, lr, 0)].get("test") is None:
                need.append((t, m, lr, 0))
    for m in args.methods:
        lr, _ = choose(rows, args.tasks, m, args.lrs)
        need += [(t, m, lr, s) for t in args.tasks for s in args.seeds if (t, m, lr, s) not in rows
                 or rows[(t, m, lr, s)].get("test") is None]
    return need


def _cfg(args, task: str, **kw) -> TrainConfig:
    return TrainConfig(model=args.model, data=args.files.get(task, task), test_file=args.test_files.get(task),
                       data_root=args.data_root, threads=args.threads, epochs=args.epochs, **kw)


def run(args, log: Path) -> None:
    if args.main_job and not any(r.get("kind") == "main-job" for r in read_rows(log)):
        r = train(_cfg(args, args.main_task), progress=False)
        _append(log, {"kind": "main-job", "task": args.main_task, "config": "library defaults (TAFT-1, probe head)",
                      "before_training_s": round(r.cache_s, 1), "train_s": round(r.train_s, 1),
                      "total_s": round(r.total_s, 1), "val": r.val_acc, "test": r.test_acc,
                      "load_1min": round(os.getloadavg()[0], 2), "device": _device(),
                      "date": utc_now()})
    caches: dict[str, dict] = {}
    while points := todo(args, table(args, log)):
        task, method, lr, seed = points[0]
        r = train(_cfg(args, task, method=method, lr=lr, seed=seed), progress=False, caches=caches.setdefault(task, {}))
        _append(log, {"kind": "grid", "task": task, "method": method, "lr": lr, "seed": seed,
                      "val": r.val_acc, "test": r.test_acc, "train_s": round(r.train_s, 1),
                      "total_s": round(r.total_s, 1), "load_1min": round(os.getloadavg()[0], 2),
                      "source": "single_defaults", "device": _device(),
                      "date": utc_now()})


def report(args, log: Path) -> str:
    rows = table(args, log)
    own = [r for r in read_rows(log) if r.get("kind") == "grid"]
    pct = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
    meta = own[-1] if own else {}
    lines = [f"# TAFT-1 and NLFT-1 defaults: the same learning-rate grid, chosen on validation ({meta.get('device')})",
             "", f"Grid lr ∈ {{{', '.join(map(str, args.lrs))}}} for both methods; everything else at the library "
             f"defaults (last block, probe head, {args.epochs or 5} epochs). Validation accuracy (%) at seed 0; "
             "test never chooses. "
             "Regenerate: `python benchmarks/single_defaults.py --threads 1`, then `--report`. "
             f"Last row {meta.get('date')}; rows marked * come from `benchmarks/search_tasks.py` "
             "(`results/search/<task>.json`, same configuration, seed 0).", ""]
    out: dict = {"grid": args.lrs, "tasks": args.tasks, "methods": {}}
    for m in args.methods:
        lines += [f"## {METHODS[m]}: validation", "", "| lr | " + " | ".join(args.tasks) + " | mean |",
                  "|---" * (len(args.tasks) + 2) + "|"]
        chosen, means = choose(rows, args.tasks, m, args.lrs)
        for lr in args.lrs:
            cells = []
            for t in args.tasks:
                r = rows.get((t, m, lr, 0))
                cells.append("—" if r is None else pct(r["val"]) + ("*" if r.get("source") == "search_tasks" else ""))
            lines.append(f"| {lr:g}{' (chosen)' if lr == chosen else ''} | " + " | ".join(cells)
                         + f" | {pct(means.get(lr))} |")
        loto = {}
        for t in args.tasks:
            lr, _ = choose(rows, [u for u in args.tasks if u != t], m, args.lrs)
            r = rows.get((t, m, lr, 0), {}) if lr is not None else {}
            loto[t] = {"lr": lr, "test": r.get("test")}
        seeds = {t: [rows.get((t, m, chosen, s), {}).get("test") for s in args.seeds] for t in args.tasks} \
            if chosen is not None else {}
        out["methods"][m] = {"chosen_lr": chosen, "mean_val": means, "left_out": loto, "default_test": seeds}
        lines.append("")
    lines += ["## Tasks never tuned on (leave one task out)", "",
              "For each task, the rate chosen on the other tasks' validation, and its test accuracy (%) on the "
              "left-out task at seed 0.", "", "| method | " + " | ".join(args.tasks) + " | mean |",
              "|---" * (len(args.tasks) + 2) + "|"]
    for m in args.methods:
        lo = out["methods"][m]["left_out"]
        tests = [lo[t]["test"] for t in args.tasks]
        mean = statistics.fmean(tests) if all(x is not None for x in tests) else None
        out["methods"][m]["left_out_mean"] = mean
        lines.append(f"| {METHODS[m]} | " + " | ".join(
            f"{pct(lo[t]['test'])} (lr {lo[t]['lr']:g})" if lo[t]["lr"] is not None else "—" for t in args.tasks)
            + f" | {pct(mean)} |")
    if all(out["methods"].get(m, {}).get("left_out_mean") is not None for m in ("taft", "nlft")):
        gap = out["methods"]["taft"]["left_out_mean"] - out["methods"]["nlft"]["left_out_mean"]
        out["taft_minus_nlft_left_out"] = gap
        lines += ["", f"TAFT-1 minus NLFT-1 on left-out tasks: {100 * gap:+.2f} points (mean over tasks)."]
    lines += ["", f"## The defaults on test, seeds {args.seeds} (mean ± std)", "",
              "| method | default lr | " + " | ".join(args.tasks) + " | mean |", "|---" * (len(args.tasks) + 3) + "|"]
    for m in args.methods:
        d = out["methods"][m]
        cells, means = [], []
        full = True
        for t in args.tasks:
            accs = [a for a in d["default_test"].get(t, []) if a is not None]  # seeds not run yet: n says so
            full = full and len(accs) == len(args.seeds)
            if accs:
                means.append(statistics.fmean(accs))
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                n = "" if len(accs) == len(args.seeds) else f" (n={len(accs)})"
                cells.append(f"{100 * means[-1]:.2f} ± {100 * sd:.2f}{n}")
            else:
                cells.append("—")
        avg = (pct(statistics.fmean(means)) + ("" if full else " (partial)")) if len(means) == len(args.tasks) \
            else "—"
        lr = f"{d['chosen_lr']:g}" if d["chosen_lr"] is not None else "—"
        lines.append(f"| {METHODS[m]} | {lr} | " + " | ".join(cells) + f" | {avg} |")
    main = [r for r in read_rows(log) if r.get("kind") == "main-job"]
    if main:
        r = main[-1]
        out["main_job"] = r
        lines += ["", "## The main job's wall time", "",
                  f"`taft train` with the library defaults on {r['task']} from a cold start ({r['device']}, "
                  f"{r['date']}, 1-minute load {r['load_1min']}): {r['before_training_s']} s before training "
                  f"(features of every split and the probe), {r['train_s']} s training, {r['total_s']} s in all; test "
                  f"{pct(r['test'])}."]
    md = "\n".join(lines) + "\n"
    write_json(args.results / "single_defaults.json", out)
    (args.results / "single_defaults.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="trec,sst2,subj,sst5,mr")
    ap.add_argument("--methods", default="taft,nlft")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3")
    ap.add_argument("--seeds", default="0,1,2", help="seeds the chosen defaults are scored on")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--main-job", action="store_true", help="time one cold-start default run on SST-2 first")
    ap.add_argument("--results", default=str(RESULTS), help="results folder (rows in <results>/single_defaults/)")
    ap.add_argument("--report", action="store_true", help="only write the report from the rows so far")
    ap.add_argument("--small", action="store_true", help="tiny random model on two generated tasks (CI smoke test)")
    args = ap.parse_args(argv)
    args.model, args.epochs, args.files, args.test_files, args.main_task = "minilm", None, {}, {}, "sst2"
    if args.small:  # two generated 3-class tasks, tiny BERT, one epoch: exercises every path in seconds
        work = Path(tempfile.mkdtemp(prefix="taft-single-defaults-"))
        for name, shift in (("a", 0), ("b", 1)):
            # every fifth label is off by one: not separable, so the rates differ on validation
            lines = [f"{(i + shift + (i % 5 == 0)) % 3} sentence {i} is {['bad', 'fine', 'good'][i % 3]}"
                     for i in range(120)]
            (work / f"{name}.txt").write_text("\n".join(lines) + "\n")
            (work / f"{name}.test.txt").write_text("\n".join(lines[:30]) + "\n")
            args.files[name], args.test_files[name] = str(work / f"{name}.txt"), str(work / f"{name}.test.txt")
        args.model, args.epochs, args.main_task = "tiny-bert", 1, "a"
        args.tasks, args.lrs, args.seeds = "a,b", "1e-3,1e-2", "0,1"
    args.tasks = args.tasks.split(",")
    args.methods = args.methods.split(",")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.results = Path(args.results)
    log = args.results / "single_defaults" / "rows.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    if not args.report:
        run(args, log)
    print(report(args, log))


if __name__ == "__main__":
    main()
