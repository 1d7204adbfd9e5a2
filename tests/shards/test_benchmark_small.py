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
    assert f["retrain_store_s"] > 0 and f["speedup_session_vs_store"] > 0 and f["speedup_session_vs_build"] > 0
    assert set(f["load_1min"]) == {"build", "session", "scratch", "store"}
    assert task["timing"]["batched_s"] > 0 and set(task["conditions"]) and task["drop_curve"]["dropped"][0] == 0
    assert (tmp_path / "shards-small.png").stat().st_size > 0 and (tmp_path / "shards-small.md").is_file()
    # the forget timing alone, at a store's defaults (store_config: TAFT lr 3e-3), merged into the same file
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shards.py"), "--small", "--out", str(tmp_path),
                           "--detail-only", "--forget-only", "--timing-repeats", "1", "--min-steps", "4"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    task = json.loads((tmp_path / "shards" / "d.json").read_text())
    assert task["forget"] == f  # kept
    assert task["forget_min_steps_4"]["lr"] == 3e-3 and task["forget_min_steps_4"]["verify_ok"]
    assert "shards trained with min_steps 4, lr 0.003" in (tmp_path / "shards-small.md").read_text()


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


def test_shard_defaults_benchmark_small(tmp_path):
    """The default lr is each rule's argmax of mean validation accuracy over the cells, read from the rows; a second
    run resumes (trains nothing)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shard_defaults.py"), "--small", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "shard_defaults-small.json").read_text())
    rows = res["rows"]
    assert len(rows) == 2 * 2 * 2 and {r["shards_trained"] for r in rows} == {2}  # K = 6: a 2-shard proxy
    for name, c in res["chosen"].items():
        mine = [r for r in rows if r["method"] == c["method"]]
        means = {lr: sum(r["val"][c["rule"]] for r in mine if r["lr"] == lr) / 2 for lr in (1e-3, 1e-2)}
        assert c["chosen_lr"] == max(sorted(means), key=lambda lr: means[lr]), name
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    rows_file = tmp_path / "shard_defaults-small" / "rows.jsonl"
    assert again.returncode == 0 and len(rows_file.read_text().splitlines()) == 8


def test_shard_head_benchmark_small(tmp_path):
    """Every (K, variant, method, lr) row is trained once; each cell reports its method's best lr on half B (ties:
    the smaller); a second run resumes (trains nothing)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shard_head.py"), "--small", "--threads", "1",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "shard_head.json").read_text())
    rows = res["rows"]
    assert {(r["K"], r["head"], r["method"], r["lr"]) for r in rows} == {
        (k, h, m, lr) for k in (2, 6) for h in ("zero-shot", "val-probe", "ce", "rsl-m5", "last2")
        for m in ("taft", "nlft") for lr in (1e-3, 1e-2)} and len(rows) == 40
    assert all(r["probe_examples"] > 0 and r["val_b_examples"] > 0 for r in rows)
    assert {r["head"] for r in rows if r["scope"] == "last:2"} == {"last2"}
    for cell in res["summary"]:
        for name, method, rule in (("TAFT (composed)", "taft", "composed"), ("SISA (vote)", "nlft", "vote")):
            mine = [r["val_b"][rule] for r in rows if (r["K"], r["head"], r["method"]) == (cell["K"], cell["head"],
                                                                                             method)]
            assert cell[name] == max(mine), (cell, name)
    log = tmp_path / "shard_head" / "rows.jsonl"
    kept = log.read_text().splitlines()
    log.write_text("\n".join(kept[:-1]) + "\n" + kept[-1][:20])  # a writer killed mid-row: that row trains again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    def key(lines):
        return [tuple(json.loads(line)[n] for n in ("K", "head", "method", "lr")) for line in lines]

    assert key(log.read_text().splitlines()) == key(kept)  # the cut row trained again, nothing else
