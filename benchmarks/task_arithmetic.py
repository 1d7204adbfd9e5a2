"""Task arithmetic on the five sentence tasks with MiniLM: non-linear, NTK and linear-layers-only task vectors.

    python benchmarks/task_arithmetic.py           # the run behind benchmarks/results/task_arithmetic.* (77 min, CPU)
    python benchmarks/task_arithmetic.py --tag reference --max-train 3000 --lrs 2e-5 --lengths 2 --seeds 0 \
        --modes nonlinear,ntk,linear-layers --no-extras --no-conditions --no-measure   # the reference run's setting
    python benchmarks/task_arithmetic.py --report  # the markdown again from the JSON
    python benchmarks/task_arithmetic.py --small   # a 2-task smoke run (tests/arithmetic/test_benchmark_smoke.py)

One shared MiniLM encoder, each task its own frozen zero-shot head (cosine head from the class descriptions). For
every mode and task, the learning rate and training length are chosen jointly on single-task validation accuracy
(:func:`taft.arithmetic.tune`: ``--lrs`` × ``--lengths``, the same grid for every mode, lengths being early-stopping
points of one schedule) with the first seed; the other ``--seeds`` rerun the chosen point with another data order.
Per seed, task addition picks one α on validation (average normalized accuracy) and reads test once; negation and
disentanglement use the first seed's vectors; "conditions" repeat the addition with every task at one lr. Fine-tuning
time and peak memory come from a separate process per mode (``--measure MODE``), so one mode's allocations do not
hide another's. Results: ``benchmarks/results/task_arithmetic[-TAG].{json,md}`` and PNGs in
``benchmarks/results/task_arithmetic[-TAG]/`` (written after every mode, so an interrupted run keeps what it
finished).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from taft.arithmetic import (
    ArithmeticConfig,
    MultiTaskSuite,
    cosine_matrix,
    disentanglement,
    task_addition,
    task_negation,
    tune,
)
from taft.arithmetic.experiments import TuneResult, grid
from taft.arithmetic.plots import cosine_heatmap, disentanglement_heatmap
from taft.train.rundir import write_json

RESULTS = Path(__file__).parent / "results"
PNG = RESULTS / "task_arithmetic"
MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2", "tiny-bert": "tiny random-init BERT"}
MAIN_MODES = ("nonlinear", "ntk", "linear-layers")
ABLATION = ("linear-layers", "attn+bias", "attn-block", "attn-block+bias")
SAME_AS = {"attn-block": "linear-layers", "attn-block+bias": "attn+bias"}  # identical tensor sets (see modes.py)
MODES = ("nonlinear", "ntk", "linear-layers", "attn+bias", "taft-last1")
NEGATION = (("sst2", "trec"), ("trec", "subj"))  # (target, control)
PAIRS = (("sst2", "trec"), ("subj", "sst5"))


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(mode: str, args) -> dict:
    """Time and peak memory of fine-tuning ``mode`` on ``--measure-examples`` sentences (run in its own process)."""
    cfg = ArithmeticConfig(model=args.model, tasks="sst2", max_train=args.measure_examples, max_eval=8,
                           max_length=args.max_length, batch_size=args.batch_size, threads=args.threads)
    suite = MultiTaskSuite.from_config(cfg)
    tm = suite.tangent_model(mode)
    suite.data("sst2", "train", tm)
    gc.collect()
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    res = suite.finetune("sst2", mode, lr=1e-5)
    peak = _status_mib("VmHWM")
    return {"mode": mode, "examples": args.measure_examples, "steps": res.steps, "train_s": res.train_s,
            "s_per_100_examples": 100 * res.train_s / args.measure_examples, "rss_before_mib": before,
            "peak_rss_mib": peak, "training_extra_mib": peak - before,
            "trainable_params": sum(t.numel() for t in res.vector.tensors.values())}


def _addition_summary(add) -> dict:
    d = add.to_dict()
    d["single_mean"] = sum(add.single_test.values()) / len(add.single_test)
    return d


def run_mode(suite: MultiTaskSuite, mode: str, args, out: dict) -> None:
    t_mode = time.perf_counter()
    rec: dict = {"grid_val": {}, "chosen": {}, "finetune_s": 0.0, "seeds": {}}
    tuned: dict[str, TuneResult] = {}
    per_seed: dict[int, list] = {s: [] for s in args.seeds}
    for task in suite.tasks:
        tuned[task] = tr = tune(suite, task, mode, lrs=args.lrs, lengths=args.lengths, seed=args.seeds[0])
        summary = tr.to_dict()
        print(json.dumps({"mode": mode, **summary}), flush=True)
        lr, n = tr.lr, tr.epochs
        rec["grid_val"][task], rec["chosen"][task] = summary["grid_val"], {"lr": lr, "epochs": n}
        rec["finetune_s"] += tr.train_s
        per_seed[args.seeds[0]].append(tr.vector)
        for seed in args.seeds[1:]:  # the chosen point again, another data order; no training past it
            ft = suite.finetune(task, mode, lr=lr, epochs=args.schedule_epochs, stop=n, seed=seed)
            rec["finetune_s"] += ft.train_s
            per_seed[seed].append(ft.vector)
    vectors = per_seed[args.seeds[0]]
    rec["trainable_params"] = sum(t.numel() for t in vectors[0].tensors.values())
    for seed, vs in per_seed.items():
        add = task_addition(suite, vs, alphas=args.alphas)
        cos = cosine_matrix(vs)
        rec["seeds"][str(seed)] = {"addition": _addition_summary(add), "cosine": cos,
                                   "mean_offdiag_cosine": _offdiag(cos)}
        print(json.dumps({"mode": mode, "seed": seed, "alpha": add.alpha, "abs": add.abs_mean,
                          "norm": add.normalized_mean}), flush=True)
    first = rec["seeds"][str(args.seeds[0])]
    rec["addition"], rec["cosine"], rec["mean_offdiag_cosine"] = first["addition"], first["cosine"], first[
        "mean_offdiag_cosine"]
    cosine_heatmap(first["cosine"], suite.tasks, PNG / f"cosine-{mode}.png", mode=mode)
    if (mode in MAIN_MODES or args.all_extras) and not args.no_extras:
        kept = dict(zip(suite.tasks, vectors, strict=True))
        rec["negation"] = [task_negation(suite, kept[t], c, alphas=args.alphas, threshold=0.95).to_dict()
                           for t, c in NEGATION if t in kept and c in kept]
        rec["disentanglement"] = []
        for a, b in PAIRS:
            if a in kept and b in kept:
                d = disentanglement(suite, kept[a], kept[b], alphas=args.dis_alphas, points=args.dis_points)
                rec["disentanglement"].append(d.to_dict())
                disentanglement_heatmap(d, PNG / f"xi-{mode}-{a}-{b}.png")
                disentanglement_heatmap(d, PNG / f"xi-rep-{mode}-{a}-{b}.png", representation=True)
    if mode in MAIN_MODES and not args.no_conditions:
        # the same addition with every task at one learning rate (its length still chosen on validation): how much
        # the comparison depends on the lr, reported for every grid point rather than one favourable setting
        rec["conditions"] = {}
        for lr in args.lrs:
            best = [tuned[t].best_at(lr) for t in suite.tasks]
            if None not in best:  # no task diverged at this lr
                vs = [tuned[t].vectors[(lr, n)] for t, (_, n) in zip(suite.tasks, best, strict=True)]
                add = task_addition(suite, vs, alphas=args.alphas)
                rec["conditions"][str(lr)] = _addition_summary(add)
                print(json.dumps({"mode": mode, "condition_lr": lr, "abs": add.abs_mean, "norm": add.normalized_mean}),
                      flush=True)
    rec["wall_s"] = time.perf_counter() - t_mode
    out["modes"][mode] = rec


def _offdiag(cos: list[list[float]]) -> float:
    k = len(cos)
    return sum(abs(cos[i][j]) for i in range(k) for j in range(k) if i != j) / (k * (k - 1))


def _shown(path: Path) -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _tuning(s: dict) -> str:
    lengths = ", ".join(f"{n:g}" for n in s["lengths"])
    if len(s["lrs"]) == 1 and len(s["lengths"]) == 1:
        return (f"**One fixed setting for every task and mode** (nothing tuned): lr {s['lrs'][0]:g}, "
                f"{s['lengths'][0]:g} epoch(s), 10 % warm-up + cosine. ")
    return ("**Learning rate and length chosen jointly on validation, per task and mode, from the same grid for "
            f"every mode**: lr ∈ {s['lrs']} × length ∈ {{{lengths}}} epochs, a length being an early-stopping point "
            f"of one 10 % warm-up + cosine schedule over {s['schedule_epochs']} epochs; the grid is searched with "
            f"seed {s['seeds'][0]}, and the other seeds rerun the chosen point with another data order. ")


def _diff(modes: dict, a: str, b: str, key: str, seeds: list[int]) -> str:
    common = [str(x) for x in seeds if str(x) in modes[a]["seeds"] and str(x) in modes[b]["seeds"]]
    d = [modes[a]["seeds"][x]["addition"][key] - modes[b]["seeds"][x]["addition"][key] for x in common]
    return _ms(d).replace("-", "−") if d else "—"


def _over(seeds: list[int]) -> str:
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"


def _alphas(adds: list[dict]) -> str:
    return ", ".join(f"{a['alpha']:g}" for a in adds)


def _ms(xs: list[float]) -> str:
    """mean ± std (%, sample std) of fractions; the mean alone for one value."""
    m = 100 * statistics.fmean(xs)
    return f"{m:.1f}" if len(xs) < 2 else f"{m:.1f} ± {100 * statistics.stdev(xs):.1f}"


def report(data: dict) -> str:
    modes, tasks = data["modes"], data["tasks"]
    zs = data["zero_shot_test"]
    s = data["settings"]
    seeds = s["seeds"]
    model = MODEL_NAMES.get(data.get("model", "minilm"), data.get("model"))
    lines = [
        f"# Task arithmetic: {model} on {len(tasks)} sentence tasks",
        "",
        f"Command: `{data['command']}` · device: {data['device']} · date: {data['date']} · "
        f"wall time {data.get('wall_s', 0) / 60:.0f} min · seeds {seeds}.",
        "",
        f"Setting: one shared {model} encoder; each task its own frozen zero-shot head (cosine head from the class "
        "descriptions, scale 20); task vectors touch the encoder only. Fine-tuning: cross-entropy, AdamW "
        f"(no weight decay), batch {s['batch_size']}, {s['max_train']} training sentences per task (one seeded sample "
        f"for every seed), max length {s['max_length']}. " + _tuning(s) +
        f"Validation: {s['max_eval']} sentences per task (SST-2/SST-5: dev file; others: 10 % carved from train); "
        f"test: {s['max_test']} sentences per task (seeded sample). Task addition: one α for Σ τ on 0…1 step "
        f"{s['alphas'][1] - s['alphas'][0]:g}, chosen on validation by average normalized accuracy, test read once "
        "per seed." + (f" Negation and disentanglement use the seed-{seeds[0]} vectors."
                       if any("negation" in r for r in modes.values()) else ""),
        "",
        f"## Task addition (test, %, {_over(seeds)}; the seed's Table 1)",
        "",
        "| mode | α per seed | abs. mean | norm. mean | single-task mean | |cos| off-diag |",
        "|---|---|---|---|---|---|",
        f"| zero-shot | — | {_pct(sum(zs.values()) / len(zs))} | — | — | — |",
    ]
    for m in MODES:
        if m not in modes:
            continue
        runs = [modes[m]["seeds"][str(x)] for x in seeds if str(x) in modes[m]["seeds"]]
        adds = [r["addition"] for r in runs]
        lines.append(f"| {m} | {_alphas(adds)} | "
                     f"**{_ms([a['abs_mean'] for a in adds])}** | **{_ms([a['normalized_mean'] for a in adds])}** | "
                     f"{_ms([a['single_mean'] for a in adds])} | "
                     f"{sum(r['mean_offdiag_cosine'] for r in runs) / len(runs):.3f} |")
    pairs = [(a, b) for a, b in (("linear-layers", "nonlinear"), ("linear-layers", "ntk"), ("ntk", "nonlinear"))
             if a in modes and b in modes]
    if pairs:
        lines += ["", "Differences per seed (same seed = same data order; points, mean ± std): "
                  + "; ".join(f"{a} − {b}: abs {_diff(modes, a, b, 'abs_mean', seeds)}, norm "
                              f"{_diff(modes, a, b, 'normalized_mean', seeds)}" for a, b in pairs) + "."]
    lines += ["", "Per task (test %, mean over seeds): merged model (α·Στ) / single-task fine-tuned "
              "(τ_t alone, α = 1):",
              "", "| mode | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
              "| zero-shot | " + " | ".join(_pct(zs[t]) for t in tasks) + " |"]
    for m in MODES:
        if m in modes:
            adds = [modes[m]["seeds"][str(x)]["addition"] for x in seeds if str(x) in modes[m]["seeds"]]
            cells = []
            for t in tasks:
                merged = sum(a["test_abs"][t] for a in adds) / len(adds)
                single = sum(a["single_test"][t] for a in adds) / len(adds)
                cells.append(f"{_pct(merged)} / {_pct(single)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## The tuning: chosen (lr, epochs) per task, and the validation grid", "",
              "| mode | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in MODES:
        if m in modes:
            ch = modes[m]["chosen"]
            lines.append(f"| {m} | " + " | ".join(f"{ch[t]['lr']:g}, {ch[t]['epochs']:g}" for t in tasks) + " |")
    cols = [(lr, n) for lr in s["lrs"] for n in s["lengths"]]
    lines += ["", "Single-task validation accuracy (%, mean over the tasks, seed "
              f"{seeds[0]}) at each grid point (lr / epochs); '—' where a run diverged:", "",
              "| mode | " + " | ".join(f"{lr:g} / {n:g}" for lr, n in cols) + " |", "|---|" + "---|" * len(cols)]
    for m in MODES:
        if m in modes:
            cells = []
            for lr, n in cols:
                v = [modes[m]["grid_val"][t][str(lr)][str(n)] for t in tasks]
                cells.append("—" if any(x is None for x in v) else _pct(sum(v) / len(v)))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any("conditions" in modes[m] for m in modes):
        lines += ["", "## Conditions: task addition with every task at one learning rate (test, %, seed "
                  f"{seeds[0]})", "",
                  "Each task's length is still chosen on validation at that lr; α chosen on validation. The comparison "
                  "at each grid point, not only at the tuned one:", "",
                  "| mode | " + " | ".join(f"lr {lr:g}: abs / norm" for lr in s["lrs"])
                  + " | tuned (above): abs / norm |",
                  "|---|" + "---|" * (len(s["lrs"]) + 1)]
        for m in MODES:
            c = modes.get(m, {}).get("conditions")
            if c is None:
                continue
            a0 = modes[m]["addition"]
            cells = [f"{_pct(c[str(lr)]['abs_mean'])} / {_pct(c[str(lr)]['normalized_mean'])}" if str(lr) in c
                     else "—" for lr in s["lrs"]]
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_pct(a0['abs_mean'])} / "
                         f"{_pct(a0['normalized_mean'])} |")
    lines += ["", "## Ablation: which attention parameters (the seed's Table 2)", "",
              "In BERT (and every supported family) the attention block's linear layers are exactly q, k, v and the "
              "output projection, so 'attention-block linears' selects the same tensors as 'q,k,v,o' — those rows "
              "repeat the measured ones.", "",
              "| variant | tensors | params | abs. mean | norm. mean |", "|---|---|---|---|---|"]
    for m in ABLATION:
        src = SAME_AS.get(m, m)
        if src in modes:
            adds = [modes[src]["seeds"][str(x)]["addition"] for x in seeds if str(x) in modes[src]["seeds"]]
            note = f" (= {src})" if src != m else ""
            lines.append(f"| {m}{note} | {'weights' if 'bias' not in m else 'weights + biases'} | "
                         f"{modes[src]['trainable_params']:,} | {_ms([a['abs_mean'] for a in adds])} | "
                         f"{_ms([a['normalized_mean'] for a in adds])} |")
    lines += ["", "## Task negation (test, %; control must keep ≥ 95 % of its zero-shot validation accuracy)", "",
              "| mode | target | control | α | target zero-shot | target after | control zero-shot | control after |",
              "|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        for n in modes.get(m, {}).get("negation", []):
            t = n["test"]
            lines.append(f"| {m} | {n['target']} | {n['control']} | {n['alpha']:g} | {_pct(t['target_zero_shot'])} | "
                         f"{_pct(t['target'])} | {_pct(t['control_zero_shot'])} | {_pct(t['control'])} |")
    lines += ["", "## Weight disentanglement error ξ (mean over the α grid; lower is better)", "",
              "ξ(α1, α2) = Σ_t disagreement between the model edited with α1τ1 + α2τ2 and the one edited with α_tτ_t "
              "alone, on test sentences of task t (`xi`: predictions, 0..2; `xi_rep`: squared distance of the "
              f"normalized embeddings), {s['dis_points']} sentences per task. Heatmaps: "
              f"`{data.get('png_dir', 'benchmarks/results/task_arithmetic')}/xi-*.png`.", "",
              "| mode | pair | mean ξ (pred.) | mean ξ (pred.) on [−1, 1]² | mean ξ (embedding) |",
              "|---|---|---|---|---|"]
    for m in MODES:
        for d in modes.get(m, {}).get("disentanglement", []):
            al = d["alphas"]
            near = [i for i in range(len(al)) if abs(al[i]) <= 1]
            inner = [d["xi"][i][j] for i in near for j in near]
            flat = [x for row in d["xi"] for x in row]
            flat_r = [x for row in d["xi_rep"] for x in row]
            lines.append(f"| {m} | {d['tasks'][0]} × {d['tasks'][1]} | {sum(flat) / len(flat):.3f} | "
                         f"{sum(inner) / len(inner):.3f} | {sum(flat_r) / len(flat_r):.4f} |")
    lines += ["", "## Cost of fine-tuning (one process per mode)", "",
              "| mode | trainable params | s / 100 sentences | peak RSS (MiB) | RSS added by training (MiB) | "
              "fine-tuning time in this run (s, all tasks, grid and seeds) |", "|---|---|---|---|---|---|"]
    for m in MODES:
        c = data.get("cost", {}).get(m)
        if c:
            ft_s = modes.get(m, {}).get("finetune_s", float("nan"))
            lines.append(f"| {m} | {c['trainable_params']:,} | {c['s_per_100_examples']:.1f} | "
                         f"{c['peak_rss_mib']:.0f} | {c['training_extra_mib']:.0f} | {ft_s:.0f} |")
    lines += ["", f"Cosine matrices (seed {seeds[0]}): "
              f"`{data.get('png_dir', 'benchmarks/results/task_arithmetic')}/cosine-*.png`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="minilm", help="text encoder (minilm | tiny-bert | hf:NAME)")
    p.add_argument("--tasks", default="mr,sst2,sst5,subj,trec")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-train", type=int, default=1000)
    p.add_argument("--max-eval", type=int, default=150)
    p.add_argument("--max-test", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="learning-rate grid (the same for every mode)")
    p.add_argument("--lengths", default="0.5,1,2",
                   help="training lengths in epochs: early-stopping points of one warm-up + cosine schedule over "
                        "the longest")
    p.add_argument("--seeds", default="0,1,2", help="data-order seeds; the grid is searched on the first")
    p.add_argument("--alpha-step", type=float, default=0.05)
    p.add_argument("--dis-points", type=int, default=30)
    p.add_argument("--measure-examples", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-extras", action="store_true", help="negation + disentanglement for every mode")
    p.add_argument("--no-extras", action="store_true", help="skip negation and disentanglement")
    p.add_argument("--no-conditions", action="store_true", help="skip task addition at each fixed lr")
    p.add_argument("--small", action="store_true", help="smoke run: 2 tasks, tiny samples (a minute or two)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; --small: "
                                                          "/tmp/taft-ta-small)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--report", action="store_true")
    p.add_argument("--no-measure", action="store_true", help="skip the per-mode time / memory processes")
    p.add_argument("--tag", default="", help="suffix of the result names (task_arithmetic-TAG.*), for other settings")
    args = p.parse_args(argv)
    if args.small:
        args.tasks, args.max_train, args.max_eval, args.max_test, args.dis_points = "sst2,trec", 32, 24, 24, 6
        args.measure_examples, args.lrs, args.lengths, args.seeds = 32, "1e-4,3e-4", "0.5,1", "0,1"
        args.alpha_step, args.modes = 0.25, "nonlinear,ntk,linear-layers"
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.lengths = sorted(float(x) for x in args.lengths.split(","))
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.schedule_epochs = math.ceil(args.lengths[-1])
    args.alphas = grid(0.0, 1.0, args.alpha_step)
    args.dis_alphas = grid(-3.0, 3.0, 1.0)
    torch.set_num_threads(args.threads)
    global RESULTS, PNG
    if args.out is not None:
        RESULTS = args.out
    elif args.small:
        RESULTS = Path("/tmp/taft-ta-small")
    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    stem = "task_arithmetic" + (f"-{args.tag}" if args.tag else "")
    PNG = RESULTS / stem
    PNG.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{stem}.json"
    if args.report:
        (RESULTS / f"{stem}.md").write_text(report(json.loads(json_path.read_text())))
        return
    t0 = time.perf_counter()
    cfg = ArithmeticConfig(model=args.model, tasks=args.tasks, max_train=args.max_train, max_eval=args.max_eval,
                           max_test=args.max_test,
                           max_length=args.max_length, batch_size=args.batch_size, threads=args.threads)
    suite = MultiTaskSuite.from_config(cfg)
    data = {"command": "python benchmarks/task_arithmetic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "device": _device(), "date": datetime.date.today().isoformat(), "tasks": suite.tasks,
            "settings": {"max_train": args.max_train, "max_eval": args.max_eval, "max_test": args.max_test,
                         "max_length": args.max_length, "batch_size": args.batch_size, "lengths": args.lengths,
                         "schedule_epochs": args.schedule_epochs, "seeds": args.seeds, "threads": args.threads,
                         "lrs": args.lrs, "alphas": args.alphas, "dis_alphas": args.dis_alphas,
                         "dis_points": args.dis_points, "seed": cfg.seed, "negation": NEGATION, "pairs": PAIRS},
            "zero_shot_test": {t: suite.accuracy("linear-layers", t, "test") for t in suite.tasks},
            "zero_shot_val": {t: suite.accuracy("linear-layers", t, "val") for t in suite.tasks},
            "modes": {}, "cost": {}, "png_dir": _shown(PNG)}
    for mode in args.modes.split(","):
        run_mode(suite, mode, args, data)
        suite.release(mode)
        data["wall_s"] = time.perf_counter() - t0
        write_json(json_path, data)
        (RESULTS / f"{stem}.md").write_text(report(data))
    for mode in [] if args.no_measure else args.modes.split(","):
        cmd = [sys.executable, __file__, "--measure", mode, "--model", args.model, "--measure-examples",
               str(args.measure_examples),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--max-length",
               str(args.max_length)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        data["cost"][mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(data["cost"][mode]), flush=True)
    data["wall_s"] = time.perf_counter() - t0
    write_json(json_path, data)
    (RESULTS / f"{stem}.md").write_text(report(data))


if __name__ == "__main__":
    main()
