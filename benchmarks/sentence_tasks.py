"""TAFT vs baselines on the five sentence tasks with MiniLM (real weights), one table.

    python benchmarks/sentence_tasks.py                      # all tasks, zero-shot / FC / NLFT-1 / TAFT-1
    python benchmarks/sentence_tasks.py --tasks trec --methods taft,nlft --scope all --tag full

FC (the linear probe) is trained with ``probe_lr`` / ``probe_epochs``, exactly like the probe that
``head_init=probe`` runs before TAFT / NLFT.
Writes ``benchmarks/results/sentence_tasks[-TAG].json`` and ``.md``: test accuracy per task and the average,
wall time per run, the device and the date. Runs of one task share the frozen-prefix feature cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
from pathlib import Path

import torch
import yaml

from taft.config import TrainConfig
from taft.train.loop import train

LABELS = {"zero-shot": "zero-shot", "fc": "FC (linear probe)", "nlft": "NLFT", "taft": "TAFT",
          "lora": "LoRA", "adapter": "(IA)³ adapter"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mr,sst2,sst5,subj,trec")
    ap.add_argument("--methods", default="zero-shot,fc,nlft,taft")
    ap.add_argument("--scope", default="last:1")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="TrainConfig overrides for every run, e.g. epochs=3 lr=2e-3")
    args = ap.parse_args(argv)

    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    rows = []
    for task in args.tasks.split(","):
        caches: dict = {}
        for method in args.methods.split(","):
            cfg = TrainConfig(data=task, method=method, scope=args.scope, data_root=args.data_root, **overrides)
            if method == "fc":  # the linear probe is trained like the probe that initializes head_init=probe
                cfg = dataclasses.replace(cfg, lr=cfg.probe_lr, epochs=cfg.probe_epochs, penalty=0.0)
            r = train(cfg, progress=False, caches=caches)
            row = {"task": task, "method": method, "scope": args.scope if method in ("taft", "nlft") else "",
                   "val_acc": r.val_acc, "test_acc": r.test_acc, "trainable_params": r.trainable_params,
                   "cache_s": round(r.cache_s, 1), "train_s": round(r.train_s, 1), "total_s": round(r.total_s, 1),
                   "epochs": r.epochs, "config": r.config}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("epochs", "config")}), flush=True)

    meta = {"date": datetime.date.today().isoformat(), "device": _device(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "command": "python benchmarks/sentence_tasks.py "
            + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "sentence_tasks" + (f"-{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(rows: list[dict], meta: dict) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys((r["method"], r["scope"]) for r in rows))
    lines = [f"Test accuracy (%), MiniLM-L6 (all-MiniLM-L6-v2, real weights). {meta['date']}, {meta['device']}, "
             f"torch {meta['torch']}.", "", f"Command: `{meta['command']}`", "",
             "| method | " + " | ".join(tasks) + " | avg | wall time (s) |",
             "|---" * (len(tasks) + 3) + "|"]
    for m, scope in methods:
        accs = [next((r["test_acc"] for r in rows if r["task"] == t and (r["method"], r["scope"]) == (m, scope)),
                     None) for t in tasks]
        secs = sum(r["total_s"] for r in rows if (r["method"], r["scope"]) == (m, scope))
        name = LABELS.get(m, m) + (f" ({scope})" if scope else "")
        avg = sum(a for a in accs if a is not None) / max(sum(a is not None for a in accs), 1)
        lines.append(f"| {name} | " + " | ".join("—" if a is None else f"{100 * a:.2f}" for a in accs)
                     + f" | {100 * avg:.2f} | {secs:.0f} |")
    lines += ["", "Wall time per run (s, end to end incl. prefix-feature cache):", "",
              "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m, scope in methods:
        secs = [next((r["total_s"] for r in rows if r["task"] == t and (r["method"], r["scope"]) == (m, scope)),
                     None) for t in tasks]
        lines.append(f"| {LABELS.get(m, m)}{f' ({scope})' if scope else ''} | "
                     + " | ".join("—" if s is None else f"{s:.0f}" for s in secs) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
