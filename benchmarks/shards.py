"""Composition and unlearning on the sentence tasks: composed TAFT vs Model Soup vs SISA as the shard count grows.

    python benchmarks/shards.py                        # SST-2 and TREC, K = 1, 10, 25, 50, conditions, timings
    python benchmarks/shards.py --tasks trec           # one task (one JSON per task, resumable; --force redoes)
    python benchmarks/shards.py --report               # tables and plots from the per-task JSONs
    python benchmarks/shards.py --small                # tiny random model, seconds (CI smoke test)

Every shard model is MiniLM's last block + head (scope last:1) trained from the same w0 with a shared zero-shot
head (data-independent: a probe head would not be forgettable), the library's defaults for everything else except
the number of epochs per shard (``--epochs``, the same for every method and K). Shards are the store's seeded
per-id hash split. Methods: **TAFT** (tangent shard models, composed by averaging Δw weighted by shard size,
which equals the weighted mean of their outputs); **Model Soup** (ordinary fine-tuning of the same parameters,
averaged the same way); **SISA** (the same ordinary shard models, majority vote of their predictions). Shards of
one K train together (the batched backend); test accuracy is read once per model, nothing is selected on test.

Per task: accuracy at each K; accuracy as shards are dropped from the K_max model (random order, seeded); the
time to forget one example (retrain its shard, through a real store) vs retraining one model from scratch;
training time of K_max shards sequential vs batched vs one model on all the data; inference time of the composed
model vs the K_max-model ensemble. On the first task also the conditions that could separate the methods
(re-initialized block PT=F; learning rate ×10; two blocks), each at K = 1 and K_max.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from taft.config import TrainConfig, store_config
from taft.data.shards import shard_jobs
from taft.delta import weighted_average
from taft.shards.training import ShardTrainer, accuracy, vote_counts
from taft.train.rundir import write_json

RESULTS = Path(__file__).parent / "results"


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _parse_rows(path: Path, data: bytes) -> tuple[list[dict], int]:
    """The rows of a JSONL log's bytes and the length of its whole part. Only a last line without its newline can
    be a row cut short by a killed writer (it is dropped, that row runs again); a bad line that ends in a newline
    is damage, not an interruption: an error naming the file and line."""
    lines = data.split(b"\n")
    whole, tail = lines[:-1], lines[-1]  # tail: what follows the last newline (b"" when the file ends in one)
    rows = []
    for n, line in enumerate(whole, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"benchmarks: error: {path}, line {n} is not a JSON row ({e}); move the file aside or "
                             f"delete that line, then rerun (finished rows are kept)") from None
    end = len(data) - len(tail)
    if tail.strip():
        try:
            rows.append(json.loads(tail))
            end = len(data)  # a whole row whose newline was not written yet
        except json.JSONDecodeError:
            pass  # cut short: dropped
    return rows, end


def read_rows(path: Path) -> list[dict]:
    """The rows of a resumable JSONL log (one JSON object a line), in order; see :func:`_parse_rows`."""
    return _parse_rows(path, path.read_bytes())[0] if path.is_file() else []


def append_row(path: Path, row: dict) -> None:
    """Append one row to a resumable JSONL log, under an exclusive lock (runs of several tasks may share a log); a
    last line cut short by a killed writer is cut off first, a whole last row missing its newline gets it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        data = f.read()
        _, end = _parse_rows(path, data)
        if end < len(data):
            f.truncate(end)
        elif data and not data.endswith(b"\n"):
            f.write(b"\n")
        f.write(json.dumps(row).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def utc_now() -> str:
    """The date stamp of every results row and file."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def train_and_validate(base: ShardTrainer, cfg: TrainConfig, jobs) -> tuple[list, float, dict[str, float]]:
    """Train ``jobs`` (batched) with ``cfg`` from ``base``'s w0 and features; the shard models, the training time
    and the validation accuracy of their composition (size weights), their vote and the mean shard model."""
    tr = ShardTrainer(cfg, base.clf, base.features, base.labels, val_features=base.val_features,
                      val_labels=base.val_labels)
    tr.validate_shards = False
    t0 = time.perf_counter()
    models = tr.train_batched(jobs)
    secs = time.perf_counter() - t0
    sizes = [float(len(ids)) for _, ids in jobs]
    per = tr.logits([m.delta for m in models], tr.val_features)
    comp = tr.logits([weighted_average([m.delta for m in models], sizes)], tr.val_features)[0]
    return models, secs, {"composed": accuracy(comp, tr.val_labels), "vote": accuracy(vote_counts(per), tr.val_labels),
                          "shard_mean": statistics.fmean(accuracy(p, tr.val_labels) for p in per)}


class Task:
    """One task's shared state: w0, the train/val/test features (computed once), and a trainer per method."""

    def __init__(self, cfg: TrainConfig, defaults=TrainConfig):
        # ``defaults(method=m)``: the configuration whose lr method m trains with unless a condition sets one
        # (TrainConfig: the library's defaults; store_config: a store's), so NLFT never inherits TAFT's rate
        self.cfg, self.defaults = cfg, defaults
        t0 = time.perf_counter()
        self.base = ShardTrainer.from_config(cfg)
        test = self.base.prep.splits.test
        self.test_labels = test.labels
        self.test = self.base.prep.cache_for(self.base.template, test, "test", False, None, "")
        self.features_s = time.perf_counter() - t0
        self.ids = list(self.base.features.ids)

    def trainer(self, method: str, **changes) -> ShardTrainer:
        cfg = dataclasses.replace(self.cfg, method=method, **{"lr": self.defaults(method=method).lr, **changes})
        if changes.get("reinit") or changes.get("scope"):  # another w0 or another start stage: its own features
            tr = ShardTrainer.from_config(cfg)
        else:
            b = self.base
            tr = ShardTrainer(cfg, b.clf, b.features, b.labels, val_features=b.val_features, val_labels=b.val_labels)
        tr.validate_shards = False  # the composed model is validated once instead
        return tr

    def train(self, trainer: ShardTrainer, k: int, chunk: int) -> tuple[list, list[float], float]:
        jobs = shard_jobs(self.ids, k, self.cfg.seed)
        t0 = time.perf_counter()
        models = trainer.train_batched(jobs, chunk=chunk)
        return models, [float(len(ids)) for _, ids in jobs], time.perf_counter() - t0

    def scores(self, trainer: ShardTrainer, models, sizes, with_vote: bool) -> dict:
        test = self.test if trainer.cfg.scope == self.cfg.scope and not trainer.cfg.reinit else \
            trainer.prep.cache_for(trainer.template, trainer.prep.splits.test, "test", False, None, "")
        composed = weighted_average([m.delta for m in models], sizes)
        out = {"composed": accuracy(trainer.logits([composed], test)[0], self.test_labels),
               "composed_val": trainer.validate(trainer.load(composed))}
        if with_vote:
            per = trainer.logits([m.delta for m in models], test)
            out["vote"] = accuracy(vote_counts(per), self.test_labels)
            out["ensemble_mean"] = accuracy((torch.tensor(sizes)[:, None, None] * per).sum(0), self.test_labels)
            out["_per_shard"] = per
        return out


def run_task(task: str, args) -> dict:
    cfg = TrainConfig(model=args.model, data=task, data_root=args.data_root, head_init=args.head_init,
                      test_file=args.test_file,
                      epochs=args.epochs, max_train=args.max_train, seed=0, threads=args.threads)
    t = Task(cfg)
    ks, kmax = args.ks, max(args.ks)
    out: dict = {"task": task, "config": dataclasses.asdict(cfg), "train_examples": len(t.ids),
                 "test_examples": len(t.test_labels), "features_s": t.features_s, "by_k": {}}
    taft, nlft = t.trainer("taft"), t.trainer("nlft")
    keep: dict = {}
    for k in ks:
        row = {}
        for name, tr in (("taft", taft), ("nlft", nlft)):
            models, sizes, secs = t.train(tr, k, args.chunk)
            s = t.scores(tr, models, sizes, with_vote=True)
            per = s.pop("_per_shard")
            if k == kmax:
                keep[name] = (models, sizes, per)
            row[name] = {**s, "train_s": secs, "shards": len(models)}
            print(json.dumps({"task": task, "K": k, "method": name, **row[name]}), flush=True)
        out["by_k"][str(k)] = {"TAFT (composed)": row["taft"]["composed"], "TAFT (vote)": row["taft"]["vote"],
                               "Model Soup": row["nlft"]["composed"], "SISA (vote)": row["nlft"]["vote"],
                               "detail": row}
    out["drop_curve"] = _drop_curve(t, keep, args)
    if task == args.detail_task:
        write_json(args.out / "shards" / f"{task}.partial.json", out)  # survives a crash of the details
        out.update(_details(t, cfg, task, taft, kmax, args))
    return out


def _details(t: Task | None, cfg: TrainConfig, task: str, taft: ShardTrainer | None, kmax: int, args) -> dict:
    key = f"forget_min_steps_{cfg.min_steps}" if cfg.min_steps else "forget"
    out = {key: {**_forget_time(cfg, task, kmax, args), "epochs": cfg.epochs, "min_steps": cfg.min_steps,
                 "lr": cfg.lr}}
    if args.forget_only:
        return out
    out["timing"] = {**_timing(t, taft, kmax, args), "epochs": cfg.epochs}
    if args.conditions:
        out["conditions"] = _conditions(t, args.condition_ks or [1, kmax], args)
        out["conditions_epochs"] = cfg.epochs
    return out


def run_details(task: str, args) -> dict:
    """Only the forget / timing / conditions parts (``--detail-only``, e.g. with fewer ``--epochs``), merged into
    the task's existing result file."""
    name = Path(task).stem  # (--small: task is a generated file)
    done = args.out / "shards" / f"{name}.json"
    partial = args.out / "shards" / f"{name}.partial.json"
    out = json.loads((done if done.is_file() else partial).read_text())
    # the store's own defaults (taft shards train: lr 3e-3 for TAFT) for every option the command does not set
    cfg = store_config(model=args.model, data=task, data_root=args.data_root, head_init=args.head_init,
                       test_file=args.test_file, epochs=args.epochs, max_train=args.max_train, seed=0,
                       threads=args.threads, min_steps=args.min_steps)
    t = None if args.forget_only else Task(cfg, defaults=store_config)
    out.update(_details(t, cfg, task, t.trainer("taft") if t else None, max(args.ks), args))
    return out


def _drop_curve(t: Task, keep: dict, args) -> dict:
    """Accuracy after dropping shards from the K_max models, in one random order (seed 0) for both methods."""
    models, sizes, per_t = keep["taft"]
    _, _, per_n = keep["nlft"]
    order = list(range(len(models)))
    random.Random(0).shuffle(order)
    steps = sorted({0, *range(0, len(models), max(1, len(models) // 10)), len(models) - 1})
    curve = {"dropped": [], "TAFT (composed)": [], "SISA (vote)": []}
    for d in steps:
        live = sorted(order[d:])
        composed = weighted_average([models[i].delta for i in live], [sizes[i] for i in live])
        curve["dropped"].append(d)
        curve["TAFT (composed)"].append(accuracy(t.base.logits([composed], t.test)[0], t.test_labels))
        curve["SISA (vote)"].append(accuracy(vote_counts(per_n[live]), t.test_labels))
    return curve


def _forget_time(cfg: TrainConfig, task: str, k: int, args) -> dict:
    """Through a real store: build K_max shards, then forget one example with --retrain three ways: in a long-lived
    process (``ShardSession``: w0, features and Δw already loaded), as a one-shot API call (``forget``: loads w0 and
    the validation features, reads the K shard files), and as the CLI (``taft shards forget``: a new interpreter);
    against retraining one model on all the data from the same features (the retrain-from-scratch alternative) in
    the same process."""
    import subprocess

    from taft.shards import ShardSession, ops

    work = Path(tempfile.mkdtemp(prefix="taft-shards-bench-"))
    try:
        store = work / "store"
        load = {}  # the 1-minute load average after each phase: the ratios below assume the CPU was equally free
        t0 = time.perf_counter()
        ops.train_store(cfg, store, k, backend="batched", chunk=args.chunk, progress=False)
        build_s = time.perf_counter() - t0
        load["build"] = os.getloadavg()[0]
        st = ops.ShardStore(store)
        victims = st.all_live_ids()[: 2 + args.timing_repeats]
        st.close()
        t0 = time.perf_counter()
        session = ShardSession(store)
        warm_s = time.perf_counter() - t0
        session_s, phases = [], []
        for victim in victims[: args.timing_repeats]:  # each forget hits another shard (or the same): both count
            t0 = time.perf_counter()
            res = session.forget([victim], retrain=True)
            session_s.append(time.perf_counter() - t0)
            phases.append(res["timing_s"])
        load["session"] = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = ops.forget(store, [victims[-2]], retrain=True)
        oneshot_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "taft.cli", "shards", "forget", "--store", str(store), "--ids",
                              victims[-1], "--retrain"], capture_output=True, text=True)
        cli_s = time.perf_counter() - t0
        ev = ops.evaluate_store(store)
        report = ops.verify(store)
        with ops.ShardStore(store) as st:  # one model on everything the store still holds, from the same features
            ids = st.all_live_ids()
            labels = dict(st.db.execute("SELECT id, label FROM examples WHERE forgotten_in IS NULL").fetchall())
            feats = ops._read_features(st)
            jobs = [(row["shard"], st.live_ids(row["shard"])) for row in st.shard_rows() if row["status"] == "live"]
        t = session.loaded.trainer
        scratch = ShardTrainer(t.cfg, t.clf, feats, labels, val_features=t.val_features, val_labels=t.val_labels)
        scratch_runs = []
        for _ in range(args.timing_repeats):
            t0 = time.perf_counter()
            scratch.train_one(0, ids)
            scratch_runs.append(time.perf_counter() - t0)
        scratch_s = statistics.median(scratch_runs)
        load["scratch"] = os.getloadavg()[0]
        # the same composed model without a store to forget through: every shard retrained (as the store trains
        # them: batched), from the same features in the same process
        store_trainer = ShardTrainer(t.cfg, t.clf, feats, labels, val_features=t.val_features,
                                     val_labels=t.val_labels)
        t0 = time.perf_counter()
        store_trainer.train_batched(jobs, chunk=args.chunk)
        store_s = time.perf_counter() - t0
        load["store"] = os.getloadavg()[0]
        med = statistics.median(session_s)
        return {"K": k, "store_build_s": build_s, "session_warm_s": warm_s, "forget_session_s": session_s,
                "forget_session_median_s": med, "session_phases_s": phases, "forget_oneshot_s": oneshot_s,
                "forget_cli_s": cli_s, "cli_rc": cli.returncode, "retrain_from_scratch_s": scratch_runs,
                "retrain_from_scratch_median_s": scratch_s, "speedup_session": scratch_s / med,
                "speedup_oneshot": scratch_s / oneshot_s, "speedup_cli": scratch_s / cli_s,
                "retrain_store_s": store_s, "speedup_session_vs_store": store_s / med,
                "speedup_session_vs_build": build_s / med, "load_1min": load, "threads": torch.get_num_threads(),
                "test_after_forget": {"composed": ev["composed"], "vote": ev["vote"]}, "verify_ok": report["ok"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _timing(t: Task, taft: ShardTrainer, k: int, args) -> dict:
    """K shards sequential vs batched (the K_max batched run above) vs one model on all the data; inference of the
    composed model vs the K-model ensemble."""
    jobs = shard_jobs(t.ids, k, t.cfg.seed)
    runs: dict[str, list[float]] = {"sequential": [], "single": [], "batched": []}
    for _ in range(args.timing_repeats):  # interleaved repeats: this machine's speed drifts by tens of percent

        def timed(name, fn):
            t0 = time.perf_counter()
            out = fn()
            runs[name].append(time.perf_counter() - t0)
            return out

        timed("sequential", lambda: [taft.train_one(shard, ids) for shard, ids in jobs])
        timed("single", lambda: taft.train_one(0, t.ids))
        bat = timed("batched", lambda: taft.train_batched(jobs, chunk=args.chunk))
    seq_s, single_s, bat_s = (statistics.median(runs[n]) for n in ("sequential", "single", "batched"))
    sizes = [float(len(ids)) for _, ids in jobs]
    models = bat
    composed = weighted_average([m.delta for m in bat], sizes)
    t0 = time.perf_counter()
    taft.logits([composed], t.test)
    comp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    taft.logits([m.delta for m in models], t.test)
    ens_s = time.perf_counter() - t0
    return {"K": k, "sequential_s": seq_s, "batched_s": bat_s, "single_model_all_data_s": single_s,
            "batched_over_single": bat_s / single_s, "sequential_over_single": seq_s / single_s,
            "repeats": runs, "batched_over_single_each": [b / s for b, s in zip(runs["batched"], runs["single"],
                                                                                 strict=True)],
            "inference_composed_s": comp_s, "inference_ensemble_s": ens_s, "ensemble_over_composed": ens_s / comp_s,
            "note": "training times exclude the shared frozen-prefix features (computed once for all)"}


CONDITIONS = {"ptf": ("PT=F (re-initialized block)", {"reinit": True}),
              "lr": ("learning rate 1e-2", {"lr": 1e-2}),
              "last2": ("two blocks (last:2)", {"scope": "last:2"})}


def _conditions(t: Task, ks: list[int], args) -> dict:
    out = {}
    for name, changes in (CONDITIONS[c] for c in args.condition_list):
        row = {}
        for method, label_c, label_v in (("taft", "TAFT (composed)", None), ("nlft", "Model Soup", "SISA (vote)")):
            tr = t.trainer(method, **changes)
            for k in ks:
                models, sizes, _ = t.train(tr, k, args.chunk)
                s = t.scores(tr, models, sizes, with_vote=label_v is not None)
                s.pop("_per_shard", None)
                row.setdefault(str(k), {})[label_c] = s["composed"]
                if label_v:
                    row[str(k)][label_v] = s["vote"]
                print(json.dumps({"condition": name, "method": method, "K": k, **s}), flush=True)
        out[name] = row
    return out


# -- report ---------------------------------------------------------------------------------------------------
def report(tasks: list[str], out_dir: Path, stem: str) -> None:
    per = {t: json.loads((out_dir / "shards" / f"{t}.json").read_text()) for t in tasks
           if (out_dir / "shards" / f"{t}.json").is_file()}
    if not per:
        sys.exit("no per-task results; run the benchmark first")
    meta = next(iter(per.values()))["meta"]
    methods = ["TAFT (composed)", "Model Soup", "SISA (vote)", "TAFT (vote)"]
    lines = [f"# Shard composition and unlearning ({meta['device']}, {meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             "Test accuracy (%) of MiniLM last block + head trained on K disjoint shards from one w0 (shared zero-shot "
             f"head), {meta['epochs']} epochs per shard, library defaults otherwise; one seed.", ""]
    for t, r in per.items():
        ks = list(r["by_k"])
        lines += [f"## {t} ({r['train_examples']} training, {r['test_examples']} test examples)", "",
                  "| method | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(f"{100 * r['by_k'][k][m]:.2f}" for k in ks) + " |")
        lines.append("")
        if "forget" in r:
            lines += _detail_lines(r)
        d = r["drop_curve"]
        lines += [f"Dropping shards from the K = {ks[-1]} model (test %): " + ", ".join(
            f"{n} dropped: TAFT {100 * a:.1f} / SISA {100 * b:.1f}"
            for n, a, b in zip(d["dropped"], d["TAFT (composed)"], d["SISA (vote)"], strict=True)), ""]
        if "conditions" in r:
            ep = r.get("conditions_epochs", "")
            lines += [f"Conditions that could separate the methods (test %, {ep} epochs per shard):", "",
                      "| condition | K | TAFT (composed) | Model Soup | SISA (vote) |", "|---|---|---|---|---|"]
            for name, row in r["conditions"].items():
                for k, v in row.items():
                    lines.append(f"| {name} | {k} | {100 * v['TAFT (composed)']:.2f} | {100 * v['Model Soup']:.2f} | "
                                 f"{100 * v['SISA (vote)']:.2f} |")
            lines.append("")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    write_json(out_dir / f"{stem}.json", per)
    _plots(per, out_dir, stem)
    print("\n".join(lines))


def _detail_lines(r: dict) -> list[str]:
    f, tm = r["forget"], r["timing"]
    cmd = f" (`{r['meta']['detail_command']}`)" if "detail_command" in r.get("meta", {}) else ""
    forget = []
    for key in sorted(k for k in r if k.startswith("forget")):
        forget += _forget_lines(r[key])
    return [
        f"Timings with {f.get('epochs', r['config']['epochs'])} epochs per shard{cmd}.", "", *forget,
        f"Training K = {tm['K']} shards (median of {len(tm.get('repeats', {}).get('single', [0]))} interleaved "
        f"runs): sequential {tm['sequential_s']:.1f} s, batched {tm['batched_s']:.1f} s, one "
        f"model on all the data {tm['single_model_all_data_s']:.1f} s (batched ÷ single "
        f"{tm['batched_over_single']:.2f}×, per run "
        f"{', '.join(f'{x:.2f}' for x in tm.get('batched_over_single_each', []))}; target ≤ 1.5×; sequential ÷ single "
        f"{tm['sequential_over_single']:.2f}×; the shared prefix features, "
        f"{r['features_s']:.1f} s, are computed once). Inference on the test set: composed model "
        f"{tm['inference_composed_s']:.2f} s (the same at every K) vs the {tm['K']}-model ensemble "
        f"{tm['inference_ensemble_s']:.2f} s ({tm['ensemble_over_composed']:.1f}×).", ""]


def _forget_lines(f: dict) -> list[str]:
    after = f["test_after_forget"]
    budget = f"min_steps {f['min_steps']}" if f.get("min_steps") else f"{f.get('epochs')} epochs"
    budget += f", lr {f['lr']:g}" if "lr" in f else ""
    if "forget_session_median_s" in f:
        ph = f["session_phases_s"][0]
        forget = [
            f"Forget one example (K = {f['K']}, shards trained with {budget}; retrain its shard through the store, "
            f"then recompose): in a long-lived "
            f"process (`ShardSession`, w0 and the shards loaded once in {f['session_warm_s']:.1f} s) "
            f"{f['forget_session_median_s']:.2f} s (median of {len(f['forget_session_s'])}; first: features "
            f"{ph['features']:.2f} s, retraining {ph['retrain']:.2f} s, recomposition {ph['compose']:.2f} s) vs "
            f"retraining one model on all the data in the same process {f['retrain_from_scratch_median_s']:.1f} s: "
            f"**{f['speedup_session']:.1f}× faster**"
            + (f"; retraining every shard of the same composed model (what exact removal costs without the "
               f"store) {f['retrain_store_s']:.1f} s: **{f['speedup_session_vs_store']:.1f}× faster**"
               if "retrain_store_s" in f else "")
            + (f"; building the store again from scratch (`train_store`: features, every shard, composition) "
               f"{f['store_build_s']:.1f} s: **{f['speedup_session_vs_build']:.1f}× faster**"
               if "speedup_session_vs_build" in f else "")
            + f". As a one-shot API call (loads w0, the validation features "
            f"and the K shard files) {f['forget_oneshot_s']:.1f} s ({f['speedup_oneshot']:.1f}×); through the CLI "
            f"(a new interpreter) {f['forget_cli_s']:.1f} s ({f['speedup_cli']:.1f}×). Test accuracy after: "
            f"composed {100 * after['composed']:.2f}, vote {100 * after['vote']:.2f}; verify "
            f"{'passed' if f['verify_ok'] else 'FAILED'}."
            + (" CPU load (1-minute average) after building / the session forgets / the one-model retrains / the "
               "store retrain: " + " / ".join(f"{v:.1f}" for v in f["load_1min"].values()) +
               f" ({f['threads']} threads; ratios are fair only where these are alike)." if "load_1min" in f else ""),
            ""]
    else:
        forget = [
            f"Forget one example (K = {f['K']}, retrain its shard through the store): {f['forget_retrain_s']:.1f} s "
            f"vs retraining one model on all the data {f['retrain_from_scratch_s']:.1f} s: {f['speedup']:.1f}× "
            f"faster; verify {'passed' if f['verify_ok'] else 'FAILED'}.", ""]
    return forget


def _plots(per: dict, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 * len(per), figsize=(5 * 2 * len(per), 3.6))
    for i, (t, r) in enumerate(per.items()):
        ax = axes[2 * i]
        ks = [int(k) for k in r["by_k"]]
        for m in ("TAFT (composed)", "Model Soup", "SISA (vote)"):
            ax.plot(ks, [100 * r["by_k"][str(k)][m] for k in ks], marker="o", label=m)
        ax.set(title=f"{t}: accuracy vs shards", xlabel="K (shards)", ylabel="test accuracy (%)")
        ax.legend()
        ax = axes[2 * i + 1]
        d = r["drop_curve"]
        for m in ("TAFT (composed)", "SISA (vote)"):
            ax.plot(d["dropped"], [100 * a for a in d[m]], marker="o", label=m)
        ax.set(title=f"{t}: dropping shards (K = {max(ks)})", xlabel="shards dropped",
               ylabel="test accuracy (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,trec")
    p.add_argument("--ks", default="1,10,25,50")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--chunk", type=int, default=25, help="shards trained together at most (memory)")
    p.add_argument("--timing-repeats", type=int, default=3, help="interleaved repeats of the training-time "
                                                                 "comparison (medians are reported)")
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-conditions", dest="conditions", action="store_false")
    p.add_argument("--detail-only", action="store_true", help="only forget/timing/conditions, merged into the "
                                                                   "task's existing results (e.g. with fewer --epochs)")
    p.add_argument("--conditions-list", dest="condition_list", default="ptf,lr,last2")
    p.add_argument("--condition-ks", default=None, help="K values of the conditions (default: 1 and the largest)")
    p.add_argument("--detail-task", default=None, help="the task that also gets forget/timing/conditions "
                                                        "(default: the first)")
    p.add_argument("--forget-only", action="store_true", help="with --detail-only: only the forget timings")
    p.add_argument("--min-steps", type=int, default=None, help="--forget-only: the shards' step budget")
    p.add_argument("--report", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--small", action="store_true", help="tiny random model on a generated task (CI smoke test)")
    args = p.parse_args()
    args.head_init, args.test_file = "zero-shot", None
    args.ks = [int(k) for k in args.ks.split(",")]
    args.condition_list = args.condition_list.split(",")
    args.condition_ks = [int(k) for k in args.condition_ks.split(",")] if args.condition_ks else None
    tasks = args.tasks.split(",")
    args.detail_task = args.detail_task or tasks[0]
    stem = "shards"
    if args.small:
        work = Path(tempfile.mkdtemp(prefix="taft-shards-small-"))
        lines = [f"{i % 3} sentence {i} is {['bad', 'fine', 'good'][i % 3]}" for i in range(150)]
        (work / "d.txt").write_text("\n".join(lines) + "\n")
        (work / "d.test.txt").write_text("\n".join(lines[:30]) + "\n")
        args.model, args.ks, args.epochs, args.conditions, stem = "tiny-bert", [1, 3, 5], 2, True, "shards-small"
        args.head_init, args.test_file = "random", str(work / "d.test.txt")
        tasks = [str(work / "d.txt")]
        args.detail_task = tasks[0]
    if not args.report:
        (args.out / "shards").mkdir(parents=True, exist_ok=True)
        for task in tasks:
            name = Path(task).stem if args.small else task
            path = args.out / "shards" / f"{name}.json"
            if args.detail_only:
                res = run_details(task, args)
            elif path.is_file() and not args.force and not args.small:
                print(f"{task}: done already ({path}); --force to redo")
                continue
            else:
                res = run_task(task, args)
            date = utc_now()
            if args.detail_only:
                c = res["config"]
                res.setdefault("meta", {"device": _device(), "date": date, "torch": torch.__version__,
                                        "epochs": c["epochs"], "command": f"python benchmarks/shards.py --tasks {task} "
                                        f"--max-train {c['max_train']} --epochs {c['epochs']} --detail-task none"})
                res["meta"]["detail_command"] = "python benchmarks/shards.py " + " ".join(sys.argv[1:])
                write_json(path, res)
                continue
            res["meta"] = {"device": _device(), "date": date,
                           "torch": torch.__version__, "epochs": args.epochs,
                           "command": "python benchmarks/shards.py " + " ".join(sys.argv[1:])}
            write_json(path, res)
        tasks = [Path(t).stem if args.small else t for t in tasks]
    if args.detail_only:  # the report covers every task with results, not only the one just timed
        tasks = sorted(p.stem for p in (args.out / "shards").glob("*.json") if "." not in p.stem)
    report(tasks, args.out, stem)


if __name__ == "__main__":
    main()
