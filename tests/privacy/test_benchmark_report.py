"""``benchmarks/privacy.py --report`` rebuilds the markdown and plot from the committed JSON."""

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "benchmarks"


def test_report_from_committed_results(tmp_path):
    spec = importlib.util.spec_from_file_location("privacy_bench", ROOT / "privacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copy(ROOT / "results" / "privacy.json", tmp_path / "privacy.json")
    module.main(["--report", "--out", str(tmp_path)])
    md = (tmp_path / "privacy.md").read_text()
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert (tmp_path / "privacy.png").stat().st_size > 10_000
    for key, combo in data["combos"].items():
        task, scope, method = key.split("/")
        assert f"| {scope} | {combo['trainable_params']:,} | {module.METHODS[method]} |" in md
        for e in combo["epsilons"].values():
            assert all(r["privacy"]["epsilon"] <= r["privacy"]["target_epsilon"] for r in e["runs"])
    assert "## Cost of privacy" in md and "| Full | tangent |" in md
