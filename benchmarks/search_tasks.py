"""The five sentence tasks with every method tuned the same way: a grid selected on validation, 3 seeds.

    python benchmarks/search_tasks.py                          # all tasks, FC / NLFT-1 / TAFT-1, seeds 0,1,2
    python benchmarks/search_tasks.py --tasks trec,sst2        # some tasks (one JSON per task, resumable)
    python benchmarks/search_tasks.py --report                 # the table from the per-task JSONs

For each task and method, ``taft.train.search.search`` trains every point of the method's default grid
(``DEFAULT_GRIDS``: the same number of points for every method) at seed 0 without touching the test split,
keeps the best validation accuracy, scores it on test, then trains the chosen setting at seeds 1 and 2.
The "defaults" row is TAFT-1 with the library defaults and no search (seed 0 is the matching grid point).
Runs of one task share the frozen-prefix features. Per-task results go to
``benchmarks/results/search/<task>.json`` (a finished task is skipped unless ``--force``); ``--report``
writes ``benchmarks/results/search_tasks.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.train.evaluate import evaluate_run
from taft.train.loop import train
from taft.train.rundir import write_json
from taft.train.search import DEFAULT_GRIDS, search

RESULTS = Path(__file__).parent / "results"
LABELS = {"fc": "FC (linear probe)", "nlft": "NLFT-1", "taft": "TAFT-1", "taft-default": "TAFT-1, defaults (no search)"}


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_task(task: str, methods: list[str], seeds: list[int], data_root: str | None, work: Path) -> dict:
    caches: dict = {}
    out: dict = {"task": task, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        if method == "taft-default":
            out["methods"][method] = _defaults_row(task, seeds, data_root, work, out["methods"].get("taft"), caches)
        else:
            cfg = TrainConfig(data=task, method=method, data_root=data_root,
                              output_dir=str(work / task / method))
            res = search(cfg, DEFAULT_GRIDS[method], seeds, progress=False, caches=caches)
            out["methods"][method] = res.to_dict()
        out["methods"][method]["wall_s"] = round(time.perf_counter() - t0, 1)
        r = out["methods"][method]
        print(json.dumps({"task": task, "method": method, "chosen": r["chosen"], "test_accs": r["test_accs"],
                          "wall_s": r["wall_s"]}), flush=True)
    return out


def _defaults_row(task, seeds, data_root, work, taft_search: dict | None, caches) -> dict:
    """TAFT with the library defaults at every seed; reuses the search's runs where they are the same run."""
    default = TrainConfig(data=task, data_root=data_root)
    setting = {k: getattr(default, k) for k in DEFAULT_GRIDS["taft"]}
    accs, vals = [], []
    for seed in seeds:
        cand = next((c for c in (taft_search or {}).get("candidates", []) if c["setting"] == setting), None)
        if taft_search and taft_search["chosen"] == setting and seed in taft_search["seeds"]:
            i = taft_search["seeds"].index(seed)  # the search chose the defaults: the same runs
            accs.append(taft_search["test_accs"][i])
            vals.append(taft_search["val_accs"][i])
        elif taft_search and seed == taft_search["seeds"][0] and cand is not None:
            res = evaluate_run(cand["output_dir"], split="test")  # that grid point *is* the default run
            accs.append(res["accuracy"])
            vals.append(cand["val_acc"])
        else:
            r = train(dataclasses.replace(default, seed=seed), progress=False, caches=caches)
            accs.append(r.test_acc)
            vals.append(r.val_acc)
    return {"method": "taft", "chosen": setting, "seeds": seeds, "test_accs": accs, "val_accs": vals,
            "test_mean": statistics.fmean(accs), "test_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "selected_on": "none (library defaults)"}


def report(tasks: list[str]) -> str:
    per = {t: json.loads((RESULTS / "search" / f"{t}.json").read_text()) for t in tasks
           if (RESULTS / "search" / f"{t}.json").is_file()}
    tasks = [t for t in tasks if t in per]
    methods = list(dict.fromkeys(m for t in tasks for m in per[t]["methods"]))
    meta = next(iter(per.values()))["meta"] if per else {}
    lines = [f"Test accuracy (%), mean ± std over seeds {meta.get('seeds')}, MiniLM-L6 (real weights), last block "
             f"+ head for NLFT/TAFT. Hyperparameters selected on the validation split at seed "
             f"{(meta.get('seeds') or [0])[0]}; test scored once per seed. {meta.get('date')}, {meta.get('device')}, "
             f"torch {meta.get('torch')}.", "", "Command: `python benchmarks/search_tasks.py`", "",
             "| method | grid | " + " | ".join(tasks) + " | avg |", "|---" * (len(tasks) + 3) + "|"]
    for m in methods:
        cells, means = [], []
        for t in tasks:
            r = per[t]["methods"].get(m)
            if r is None:
                cells.append("—")
                continue
            means.append(r["test_mean"])
            cells.append(f"{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f}")
        # the grid each task's run searched (its results file), which need not be today's DEFAULT_GRIDS
        grids = {json.dumps(per[t]["methods"][m].get("grid"), sort_keys=True) for t in tasks if m in per[t]["methods"]}
        grid = "; ".join("; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in json.loads(g).items())
                         for g in sorted(grids) if g != "null") or "—"
        avg = f"{100 * statistics.fmean(means):.2f}" if len(means) == len(tasks) else "—"
        lines.append(f"| {LABELS.get(m, m)} | {grid} | " + " | ".join(cells) + f" | {avg} |")
    lines += ["", "Chosen settings (by validation accuracy at the selection seed):", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        if m not in DEFAULT_GRIDS:
            continue
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(
            ", ".join(f"{k}={v}" for k, v in per[t]["methods"][m]["chosen"].items()) if m in per[t]["methods"]
            else "—" for t in tasks) + " |")
    lines += ["", "Wall time per task and method (s, search + seeds, this machine):", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in methods:
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(
            f"{per[t]['methods'][m]['wall_s']:.0f}" if m in per[t]["methods"] else "—" for t in tasks) + " |")
    md = "\n".join(lines) + "\n"
    (RESULTS / "search_tasks.json").write_text(json.dumps({"tasks": per}, indent=2))
    (RESULTS / "search_tasks.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mr,sst2,sst5,subj,trec")
    ap.add_argument("--methods", default="fc,nlft,taft,taft-default")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--work", default="/tmp/taft-search-bench", help="run folders of every candidate and seed")
    ap.add_argument("--force", action="store_true", help="rerun tasks that already have a result file")
    ap.add_argument("--report", action="store_true", help="only aggregate the per-task files")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    if args.report:
        print(report(tasks))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    (RESULTS / "search").mkdir(parents=True, exist_ok=True)
    for task in tasks:
        path = RESULTS / "search" / f"{task}.json"
        if path.is_file() and not args.force:
            print(f"{task}: {path} exists, skipped (--force reruns it)")
            continue
        work = Path(args.work)
        if (work / task).exists():
            import shutil

            shutil.rmtree(work / task)
        out = run_task(task, args.methods.split(","), seeds, args.data_root, work)
        out["meta"] = {"date": datetime.date.today().isoformat(), "device": _device(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "seeds": seeds,
                       "command": "python benchmarks/search_tasks.py " + " ".join(sys.argv[1:])}
        write_json(path, out)  # atomic: a killed run never leaves a half-written task file
    print(report(args.tasks.split(",")))


if __name__ == "__main__":
    main()
