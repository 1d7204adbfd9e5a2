"""``benchmarks/single_defaults.py --small``: each method's default is the argmax of its mean validation accuracy,
a left-out task is scored at the rate the *other* tasks chose, and a rerun resumes without training."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_single_defaults_benchmark_small(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "single_defaults.py"), "--small", "--main-job",
           "--threads", "1", "--results", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "single_defaults" / "rows.jsonl").read_text().splitlines()]
    grid = [r for r in rows if r.get("kind") == "grid" and r["seed"] == 0]
    assert {(r["task"], r["method"], r["lr"]) for r in grid} == {
        (t, m, lr) for t in "ab" for m in ("taft", "nlft") for lr in (1e-3, 1e-2)}
    assert sum(r.get("kind") == "main-job" for r in rows) == 1
    res = json.loads((tmp_path / "single_defaults.json").read_text())
    val = {(r["task"], r["method"], r["lr"]): r["val"] for r in grid}
    test = {(r["task"], r["method"], r["lr"]): r["test"] for r in grid}
    for m in ("taft", "nlft"):
        d = res["methods"][m]
        means = {lr: (val[("a", m, lr)] + val[("b", m, lr)]) / 2 for lr in (1e-3, 1e-2)}
        assert d["chosen_lr"] == max(sorted(means), key=lambda lr: (means[lr], -lr)), m
        for left, other in (("a", "b"), ("b", "a")):  # chosen on the other task's validation only
            lr = max((1e-3, 1e-2), key=lambda x: (val[(other, m, x)], -x))
            assert d["left_out"][left] == {"lr": lr, "test": test[(left, m, lr)]}, (m, left)
        seeds = {r["seed"] for r in rows if r.get("kind") == "grid" and r["method"] == m and r["lr"] == d["chosen_lr"]}
        assert seeds == {0, 1} and all(x is not None for t in "ab" for x in d["default_test"][t]), m
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((tmp_path / "single_defaults" / "rows.jsonl").read_text().splitlines()) == len(rows)
    assert "Tasks never tuned on" in (tmp_path / "single_defaults.md").read_text()
