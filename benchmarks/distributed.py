"""Data-parallel scaling: the same `taft train` under torchrun with 1 and with 2 processes (one thread each).

    python benchmarks/distributed.py                       # MiniLM on SST-2 -> benchmarks/results/distributed.{json,md}
    python benchmarks/distributed.py --max-train 256 --repeats 1    # a quick look

Each case is ``python -m torch.distributed.run --standalone --nproc-per-node N -m taft train ...`` (gloo on CPU),
``--threads 1`` per process, run ``--repeats`` times (the fastest kept: other work on a shared machine only slows a
run down). Measured from rank 0's results.json: the training loop's throughput (examples · epochs / train_s: the
step loop over the cached features, one all-reduce per step), the prefix-feature throughput (training examples /
cache_s: each rank computes its own examples' features), and the wall time of the whole command (process start-up,
imports and model loading included). The 2-process Δw is compared with the 1-process one (max |ΔΔw| relative to
the largest entry), so the numbers come from runs that agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _run(n: int, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "taft",
           "train", "--model", args.model, "--data", args.data, "--head-init", "zeros", "--scope", args.scope,
           "--max-train", str(args.max_train), "--max-eval", str(args.max_eval), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--threads", "1", "--output-dir", str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    r = json.loads((out / "results.json").read_text())
    examples = args.max_train  # SST-2 has far more: the first max_train are used
    return {"processes": n, "wall_s": wall, "train_s": r["train_s"], "cache_s": r["cache_s"],
            "train_examples_per_s": examples * args.epochs / r["train_s"], "cache_examples_per_s":
            examples / r["cache_s"], "val_acc": r["val_acc"], "world_size": r["world_size"],
            "load_avg_1min_after": os.getloadavg()[0], "command": " ".join(cmd[1:])}


def _delta_err(a: Path, b: Path, *, skip: str | None = None) -> float:
    """max |Δw_b − Δw_a| / max |Δw_a| over the tensors whose name does not contain ``skip``."""
    import torch

    from taft.checkpoint import load_safetensors

    da, db = load_safetensors(a / "delta.safetensors")[0], load_safetensors(b / "delta.safetensors")[0]
    names = [k for k in sorted(da) if skip is None or skip not in k]
    fa = torch.cat([da[k].flatten() for k in names])
    fb = torch.cat([db[k].flatten() for k in names])
    return float((fa - fb).abs().max() / fa.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--data", default="sst2")
    p.add_argument("--scope", default="last:1")
    p.add_argument("--max-train", type=int, default=1024)
    p.add_argument("--max-eval", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="taft-ddp-bench-"))
    load_before = os.getloadavg()[0]
    cases = {}
    for n in (1, 2):
        runs = [_run(n, args, work / f"n{n}") for _ in range(args.repeats)]
        cases[n] = min(runs, key=lambda r: r["train_s"])
        cases[n]["repeats"] = [{k: r[k] for k in ("wall_s", "train_s", "cache_s")} for r in runs]
    one, two = cases[1], cases[2]
    res = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python benchmarks/distributed.py " + " ".join(sys.argv[1:]),
           "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, shared with "
                     f"other work: 1-min load average {load_before:.2f} before the runs), gloo; no GPU",
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "cases": [one, two],
           "speedup_train": one["train_s"] / two["train_s"], "speedup_cache": one["cache_s"] / two["cache_s"],
           "speedup_wall": one["wall_s"] / two["wall_s"],
           "delta_max_rel_err_2_vs_1": _delta_err(work / "n1", work / "n2"),
           "delta_max_rel_err_2_vs_1_without_key_bias": _delta_err(work / "n1", work / "n2", skip="key.bias")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(res, indent=2) + "\n")
    md = [f"# Data-parallel scaling on CPU, 1 → 2 processes ({res['date']})", "",
          f"Command: `{res['command']}`  ", f"Device: {res['device']}  ",
          f"Run: `{two['command']}` (and `--nproc-per-node 1`), fastest of {args.repeats}", "",
          "| processes | train loop (examples/s) | prefix features (examples/s) | train s | cache s | wall s "
          "| val acc |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {c['processes']} | {c['train_examples_per_s']:.1f} | {c['cache_examples_per_s']:.1f} | "
           f"{c['train_s']:.2f} | {c['cache_s']:.2f} | {c['wall_s']:.1f} | {c['val_acc']:.4f} |" for c in (one, two)]
    md += ["", f"Speed-up with 2 processes: training loop ×{res['speedup_train']:.2f}, prefix features "
               f"×{res['speedup_cache']:.2f}, whole command ×{res['speedup_wall']:.2f}.", "",
          f"Agreement: max |Δw₂ − Δw₁| / max |Δw₁| = {res['delta_max_rel_err_2_vs_1']:.1e} over all of Δw, "
          f"{res['delta_max_rel_err_2_vs_1_without_key_bias']:.1e} without the attention key biases (their gradient "
          "is zero in exact arithmetic: softmax ignores a shift of every score of a query, so Adam steps on "
          "floating-point noise there, which differs with any change of summation order)."]
    (args.out / "distributed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
