"""``benchmarks/task_arithmetic.py --small`` runs end to end (tiny BERT, two real tasks) and its results obey the
protocol: the chosen (lr, length) is the validation argmax, α is on the grid, normalized accuracy is merged ÷ single,
the cosine matrices are symmetric with a unit diagonal, and the markdown is a function of the JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "task_arithmetic.py"


def _script():
    spec = importlib.util.spec_from_file_location("task_arithmetic_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ta-bench")
    script = _script()
    threads = torch.get_num_threads()  # the script sets its own; keep the test process's
    script.main(["--small", "--model", "tiny-bert", "--no-measure", "--out", str(out), "--threads", str(threads)])
    return script, out, json.loads((out / "task_arithmetic.json").read_text())


def test_protocol_holds_in_the_results(run):
    _, _, data = run
    s = data["settings"]
    assert s["seeds"] == [0, 1] and s["alphas"][1] - s["alphas"][0] == pytest.approx(0.25)
    assert set(data["modes"]) == {"nonlinear", "ntk", "linear-layers"}
    for mode, rec in data["modes"].items():
        for task, chosen in rec["chosen"].items():
            assert chosen["lr"] in s["lrs"] and chosen["epochs"] in s["lengths"]
            grid = rec["grid_val"][task]
            assert set(grid) == {str(lr) for lr in s["lrs"]}
            best = max(v for row in grid.values() for v in row.values() if v is not None)
            assert grid[str(chosen["lr"])][str(chosen["epochs"])] == best, (mode, task)
        assert set(rec["seeds"]) == {"0", "1"} and set(rec["conditions"]) == {str(lr) for lr in s["lrs"]}
        for seed in rec["seeds"].values():
            add = seed["addition"]
            assert add["alpha"] in s["alphas"]
            for t in data["tasks"]:
                assert add["test_normalized"][t] == pytest.approx(add["test_abs"][t] / add["single_test"][t])
            assert add["abs_mean"] == pytest.approx(sum(add["test_abs"].values()) / len(data["tasks"]))
            cos = seed["cosine"]
            assert all(cos[i][i] == pytest.approx(1.0) for i in range(len(cos)))
            assert all(cos[i][j] == cos[j][i] for i in range(len(cos)) for j in range(len(cos)))
        assert len(rec["negation"]) == 1 and len(rec["disentanglement"]) == 1  # the pairs within sst2, trec


def test_outputs_and_report(run):
    script, out, _ = run
    png = out / "task_arithmetic"
    for mode in ("nonlinear", "ntk", "linear-layers"):
        for name in (f"cosine-{mode}.png", f"xi-{mode}-sst2-trec.png", f"xi-rep-{mode}-sst2-trec.png"):
            assert (png / name).stat().st_size > 0
    md = (out / "task_arithmetic.md").read_text()
    assert "± " in md and "## Conditions" in md and "| linear-layers |" in md
    (out / "task_arithmetic.md").unlink()
    script.main(["--report", "--out", str(out)])
    assert (out / "task_arithmetic.md").read_text() == md
