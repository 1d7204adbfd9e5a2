"""``benchmarks/shards.py --small`` and ``benchmarks/shard_crash.py`` run end to end and their results are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_shards_benchmark_small(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shards.py"), "--small", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "shards-small.json").read_text())
    (task,) = res.values()
    assert list(task["by_k"]) == ["1", "3", "5"]
    for row in task["by_k"].values():
        taft = row["detail"]["taft"]
        assert taft["composed"] == taft["ensemble_mean"]  # the composed model is the size-weighted ensemble
        assert all(0.0 <= row[m] <= 1.0 for m in ("TAFT (composed)", "Model Soup", "SISA (vote)"))
    f = task["forget"]
    assert f["verify_ok"] and f["cli_rc"] == 0 and f["forget_session_median_s"] > 0 and f["forget_oneshot_s"] > 0
    assert f["retrain_store_s"] > 0 and f["speedup_session_vs_store"] > 0
    assert task["timing"]["batched_s"] > 0 and set(task["conditions"]) and task["drop_curve"]["dropped"][0] == 0
    assert (tmp_path / "shards-small.png").stat().st_size > 0 and (tmp_path / "shards-small.md").is_file()


def test_tuned_shards_benchmark_small(tmp_path):
    """Equal tuning: each method's chosen lr is its validation argmax by its own rule; 3 seeds per chosen cell."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shards_tuned.py"), "--small", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "shards_tuned" / "d.jsonl").read_text().splitlines()]
    for sel in (r for r in rows if r["step"] == "select"):
        for name, chosen in sel["chosen"].items():
            rule = "composed" if name in ("TAFT (composed)", "Model Soup") else "vote"
            vals = [c["val"][rule] for c in sel["candidates"]]
            assert chosen["val"] == max(vals) and chosen["lr"] == sel["candidates"][vals.index(max(vals))]["lr"]
    summary = json.loads((tmp_path / "shards_tuned-small.json").read_text())["d"]["summary"]
    assert set(summary) == {"pt-t", "pt-f"}
    assert all(len(cell["test"]) == 3 for by_k in summary.values() for c in by_k.values() for cell in c.values())
    assert (tmp_path / "shards_tuned-small.png").stat().st_size > 0


def test_grow_benchmark_small(tmp_path):
    """Data in 5 chunks: after every chunk the grown stores verify and TAFT's composed model is its ensemble."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shards_grow.py"), "--small", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = json.loads((tmp_path / "shards_grow-small.json").read_text())["tasks"]["toy"]
    assert task["chunks"] == [1, 2, 3, 4, 5] and task["verify_ok"] and task["composed_equals_ensemble"]
    assert task["live_shards"] == sorted(task["live_shards"]) and task["live_shards"][-1] > task["live_shards"][0]
    assert task["examples"] == sorted(task["examples"])
    assert (tmp_path / "shards_grow-small.png").stat().st_size > 0 and (tmp_path / "shards_grow-small.md").is_file()
