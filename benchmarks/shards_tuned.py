"""Composed TAFT vs Model Soup vs SISA under equal tuning: the same grid for every method, chosen on validation, at
every K, 3 seeds.

    python benchmarks/shards_tuned.py --regimes pt-t,large-lr      # TREC, SST-2, MR; resumable (one JSONL per task)
    python benchmarks/shards_tuned.py --report                     # markdown + JSON + plot
    python benchmarks/shards_tuned.py --small                                     # tiny random model (CI smoke test)

Protocol, per task, regime and K (every shard from one w0, MiniLM's last block + head, the store's seeded split):
1. At seed 0, every grid point trains the K shard models of TAFT (tangent) and of ordinary fine-tuning (NLFT), all
   shards at once (batched backend), and is scored on the **validation split only**.
2. Each method keeps its validation argmax by the rule it is used with (ties: the earlier point): composed TAFT and
   Model Soup by the composed model's accuracy, SISA and TAFT's own vote by the majority vote's.
3. The chosen points are scored on test once, and retrained at seeds 1 and 2 (another split into shards, another
   batch order; for PT=F also another re-initialized block): mean ± std over the 3 seeds.

Regimes: ``pt-t`` (pretrained block, zero-shot head; lr ∈ {1e-3, 3e-3}), ``large-lr`` (the same, lr ∈ {1e-2,
3e-2}: large steps), ``pt-f`` (the paper's PT=F: block and head re-initialized; lr ∈ {1e-3, 3e-3}). Everything
else is the store's defaults. Validation examples are never training examples of a store.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from taft.config import TrainConfig
from taft.data.shards import shard_jobs
from taft.delta import weighted_average
from taft.shards.training import ShardTrainer, accuracy, vote_counts
from taft.train.rundir import write_json

sys.path.insert(0, str(Path(__file__).parent))
from shards import _device, append_row, read_rows, utc_now  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REGIMES = {
    "pt-t": ("PT=T: pretrained block, zero-shot head", {}, [1e-3, 3e-3]),
    "large-lr": ("PT=T with large steps (lr ≥ 1e-2)", {}, [1e-2, 3e-2]),
    "pt-f": ("PT=F: block and head re-initialized", {"reinit": True, "head_init": "random"}, [1e-3, 3e-3]),
}
RULES = {"TAFT (composed)": ("taft", "composed"), "TAFT (vote)": ("taft", "vote"),
         "Model Soup": ("nlft", "composed"), "SISA (vote)": ("nlft", "vote")}


class Bench:
    """One task's data and w0 per (regime, seed), built once and shared by every cell."""

    def __init__(self, args, task: str):
        self.args, self.task = args, task
        self._trainers: dict = {}

    def config(self, regime: str, seed: int, **changes) -> TrainConfig:
        _, extra, _ = REGIMES[regime]
        base = dict(model=self.args.model, data=self.task, data_root=self.args.data_root, test_file=self.args.test_file,
                    head_init=self.args.head_init, epochs=self.args.epochs, min_steps=self.args.min_steps,
                    max_train=self.args.max_train, seed=seed, threads=self.args.threads)
        return TrainConfig(**{**base, **extra, **changes})

    def trainer(self, regime: str, seed: int, method: str, lr: float) -> ShardTrainer:
        w0_seed = seed if REGIMES[regime][1].get("reinit") else 0  # PT=T: one w0 for every seed
        key = (bool(REGIMES[regime][1]), w0_seed)
        if key not in self._trainers:
            b = ShardTrainer.from_config(self.config(regime, w0_seed))
            test = b.prep.cache_for(b.template, b.prep.splits.test, "test", False, None, "")
            self._trainers = {key: (b, test, b.prep.splits.test.labels)}  # one w0 in memory at a time
        b, test, labels = self._trainers[key]
        cfg = self.config(regime, seed, method=method, lr=lr)
        tr = ShardTrainer(cfg, b.clf, b.features, b.labels, val_features=b.val_features, val_labels=b.val_labels)
        tr.validate_shards = False
        tr.test, tr.test_labels = test, labels
        return tr


def _scores(tr: ShardTrainer, models, sizes, split: str) -> dict[str, float]:
    cache, labels = (tr.val_features, tr.val_labels) if split == "val" else (tr.test, tr.test_labels)
    composed = tr.logits([weighted_average([m.delta for m in models], sizes)], cache)[0]
    per = tr.logits([m.delta for m in models], cache)
    return {"composed": accuracy(composed, labels), "vote": accuracy(vote_counts(per), labels)}


def run_group(bench: Bench, regime: str, k: int, method: str, seeds: list[int], done: set, log: Path) -> None:
    """Seed 0: the grid, selection on validation, test of the chosen points; then the chosen points at the other
    seeds (``seeds[:1]``: only the first part). One JSONL line per finished step (resumable)."""
    _, _, lrs = REGIMES[regime]
    key0 = (regime, k, method, "select")
    rules = {r: rule for r, (m, rule) in RULES.items() if m == method}
    if key0 not in done:
        cands, keep = [], {}
        for lr in lrs:
            tr = bench.trainer(regime, seeds[0], method, lr)
            jobs = shard_jobs(list(tr.features.ids), k, seeds[0])
            sizes = [float(len(i)) for _, i in jobs]
            t0 = time.perf_counter()
            try:
                models = tr.train_batched(jobs, chunk=bench.args.chunk)
                val = _scores(tr, models, sizes, "val")
            except Exception as e:  # noqa: BLE001 — a diverged point is recorded and never chosen
                models, val = None, {"composed": float("nan"), "vote": float("nan"), "error": str(e)}
            cands.append({"lr": lr, "val": val, "train_s": time.perf_counter() - t0})
            keep[lr] = (tr, models, sizes)
        chosen = {}
        for name, rule in rules.items():
            ok = [i for i, c in enumerate(cands) if c["val"][rule] == c["val"][rule]]
            best = max(ok, key=lambda i: (cands[i]["val"][rule], -i))
            lr = cands[best]["lr"]
            tr, models, sizes = keep[lr]
            chosen[name] = {"lr": lr, "val": cands[best]["val"][rule],
                            "test": _scores(tr, models, sizes, "test")[rule]}
        _append(log, {"regime": regime, "K": k, "method": method, "step": "select", "seed": seeds[0],
                      "candidates": cands, "chosen": chosen})
        done.add(key0)
    chosen = next(r for r in read_rows(log) if (r["regime"], r["K"], r["method"], r["step"]) == key0[:3] + ("select",))
    for seed in seeds[1:]:
        for lr in sorted({c["lr"] for c in chosen["chosen"].values()}):
            key = (regime, k, method, f"seed-{seed}-lr-{lr}")
            if key in done:
                continue
            tr = bench.trainer(regime, seed, method, lr)
            jobs = shard_jobs(list(tr.features.ids), k, seed)
            sizes = [float(len(i)) for _, i in jobs]
            t0 = time.perf_counter()
            models = tr.train_batched(jobs, chunk=bench.args.chunk)
            secs = time.perf_counter() - t0
            _append(log, {"regime": regime, "K": k, "method": method, "step": key[3], "seed": seed, "lr": lr,
                          "val": _scores(tr, models, sizes, "val"), "test": _scores(tr, models, sizes, "test"),
                          "train_s": secs})
            done.add(key)


def _write_meta(log: Path, args) -> None:
    # one meta file per task; each regime keeps every command that added rows to it, with its date, Ks and budget
    path = log.with_suffix(".meta.json")
    old = json.loads(path.read_text()) if path.is_file() and not args.force else {}
    runs = old.get("regimes", {r: {k: old[k] for k in ("date", "command", "epochs", "min_steps")}
                               for r in {row["regime"] for row in read_rows(log)} - set(args.regimes)} if old else {})
    now = {"date": utc_now(),
           "command": "python benchmarks/shards_tuned.py " + " ".join(sys.argv[1:]),
           "ks": args.ks, "epochs": args.epochs, "min_steps": args.min_steps}
    for r in args.regimes:
        done = _runs(runs.get(r))
        runs[r] = {"runs": [x for x in done if x["command"] != now["command"]] + [now]}
    write_json(path, {"device": _device(), "torch": torch.__version__, "seeds": args.seeds, **now, "regimes": runs})


def _runs(entry: dict | None) -> list[dict]:
    """The runs recorded for one regime (an older meta file kept only the last run, as a single entry)."""
    if not entry:
        return []
    return entry.get("runs", [entry])


def _append(path: Path, row: dict) -> None:
    append_row(path, row)
    print(json.dumps({k: v for k, v in row.items() if k != "candidates"}), flush=True)


def run_task(task: str, args) -> None:
    name = Path(task).stem if args.small else task
    log = args.out / "shards_tuned" / f"{name}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.force and log.exists():
        log.unlink()
    done = {(r["regime"], r["K"], r["method"], r["step"]) for r in read_rows(log)}
    _write_meta(log, args)  # now and at the end: an interrupted run's rows still name their command
    bench = Bench(args, task)
    for regime in args.regimes:
        for k in args.ks:  # every method's seed-0 selection before any method's further seeds
            for seeds in (args.seeds[:1], args.seeds):
                for method in ("taft", "nlft"):
                    run_group(bench, regime, k, method, seeds, done, log)
    _write_meta(log, args)


# -- report -----------------------------------------------------------------------------------------------------
def summarize(rows: list[dict], seeds: list[int]) -> dict:
    """{regime: {K: {method label: {"lr", "val", "test": [per seed], "mean", "std"}}}} from one task's lines."""
    out: dict = {}
    sel = [r for r in rows if r["step"] == "select"]
    for s in sel:
        for name, c in s["chosen"].items():
            tests = [c["test"]]
            rule = RULES[name][1]
            for seed in seeds[1:]:
                match = [r for r in rows if (r["regime"], r["K"], r["method"]) == (s["regime"], s["K"], s["method"])
                         and r["step"] == f"seed-{seed}-lr-{c['lr']}"]
                if match:
                    tests.append(match[0]["test"][rule])
            cell = {"lr": c["lr"], "val": c["val"], "test": tests, "mean": statistics.fmean(tests),
                    "std": statistics.stdev(tests) if len(tests) > 1 else 0.0}
            out.setdefault(s["regime"], {}).setdefault(str(s["K"]), {})[name] = cell
    return out


def report(tasks: list[str], out_dir: Path, stem: str, seeds: list[int]) -> None:
    per = {}
    for t in tasks:
        log = out_dir / "shards_tuned" / f"{t}.jsonl"
        if log.is_file():
            per[t] = {"summary": summarize(read_rows(log), seeds), "meta": json.loads(log.with_suffix(".meta.json")
                                                                                    .read_text())}
    if not per:
        sys.exit("no results; run the benchmark first")
    lines = [f"# Composed TAFT vs Model Soup vs SISA under equal tuning ({next(iter(per.values()))['meta']['device']})",
             "", "Each method's learning rate chosen on validation from the same grid at every K (seed 0), by the "
             "rule the method is used with; test accuracy (%) of the chosen setting, mean ± std over the seeds "
             "listed (another split into shards and batch order per seed). Regenerate: "
             "`python benchmarks/shards_tuned.py --report`.", ""]
    for t, r in per.items():
        m = r["meta"]
        lines += [f"## {t}", "", f"seeds {m['seeds']}", ""]
        for regime, by_k in r["summary"].items():
            ks = sorted(by_k, key=int)
            runs = _runs(m.get("regimes", {}).get(regime)) or [m]
            budgets = {(x["epochs"], x["min_steps"]) for x in runs}
            budget = (f"{runs[0]['epochs']} epochs per shard, min_steps {runs[0]['min_steps']}" if len(budgets) == 1
                      else f"MIXED budgets {sorted(budgets, key=str)}: not comparable across K")
            lines += [f"**{REGIMES[regime][0]}** (lr grid {REGIMES[regime][2]}; "
                      + "; ".join(f"`{x['command']}`, {x['date']}" for x in runs) + f"; {budget})", "",
                      "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for name in RULES:
                cells = [by_k[k].get(name) for k in ks]
                lines.append(f"| {name} | " + " | ".join(
                    f"{100 * c['mean']:.1f}" + (f" ± {100 * c['std']:.1f}" if len(c["test"]) > 1 else "")
                    + (f" (n={len(c['test'])})" if len(c["test"]) != len(seeds) else "")
                    if c else "—" for c in cells) + " |")
            lines.append("| chosen lr (TAFT / Soup / SISA) | " + " | ".join(
                " / ".join(f"{by_k[k][n]['lr']:g}" if n in by_k[k] else "—"
                           for n in ("TAFT (composed)", "Model Soup", "SISA (vote)")) for k in ks) + " |")
            gaps = []
            for k in ks:
                c = by_k[k]
                if all(n in c for n in ("TAFT (composed)", "Model Soup", "SISA (vote)")):
                    best = max(c["Model Soup"]["mean"], c["SISA (vote)"]["mean"])
                    gaps.append(f"K = {k}: {100 * (c['TAFT (composed)']['mean'] - best):+.1f}")
            lines += ["", "Composed TAFT minus the better of Soup and SISA (points): " + ", ".join(gaps), ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    write_json(out_dir / f"{stem}.json", per)
    _plot(per, out_dir / f"{stem}.png")
    print("\n".join(lines))


def _plot(per: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, regime) for t, r in per.items() for regime in r["summary"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (t, regime) in zip(axes[0], panels, strict=True):
        by_k = per[t]["summary"][regime]
        ks = sorted(by_k, key=int)
        for name in ("TAFT (composed)", "Model Soup", "SISA (vote)"):
            xs = [int(k) for k in ks if name in by_k[k]]
            ax.errorbar(xs, [100 * by_k[str(k)][name]["mean"] for k in xs],
                        yerr=[100 * by_k[str(k)][name]["std"] for k in xs], marker="o", capsize=3, label=name)
        ax.set(title=f"{t}: {regime}", xlabel="K (shards)", ylabel="test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="trec,sst2,mr")
    p.add_argument("--regimes", default="pt-t,large-lr")
    p.add_argument("--ks", default="1,10,25,50")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--min-steps", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--small", action="store_true", help="tiny random model on a generated task (CI smoke test)")
    args = p.parse_args()
    args.head_init, args.test_file = "zero-shot", None
    args.ks = [int(k) for k in args.ks.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.regimes = args.regimes.split(",")
    tasks, stem = args.tasks.split(","), "shards_tuned"
    if args.small:
        work = Path(tempfile.mkdtemp(prefix="taft-shards-tuned-"))
        lines = [f"{i % 3} sentence {i} is {['bad', 'fine', 'good'][i % 3]}" for i in range(150)]
        (work / "d.txt").write_text("\n".join(lines) + "\n")
        (work / "d.test.txt").write_text("\n".join(lines[:30]) + "\n")
        args.model, args.ks, args.epochs, stem = "tiny-bert", [1, 3], 1, "shards_tuned-small"
        args.head_init, args.test_file, args.regimes = "random", str(work / "d.test.txt"), ["pt-t", "pt-f"]
        tasks = [str(work / "d.txt")]
    if not args.report:
        for task in tasks:
            run_task(task, args)
    names = [Path(t).stem if args.small else t for t in tasks]
    report(names, args.out, stem, args.seeds)


if __name__ == "__main__":
    main()
