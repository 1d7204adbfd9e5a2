"""``taft train --dp-epsilon``: config checks, the private loop end to end, and what results.json records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taft.cli import main
from taft.config import ConfigError, TrainConfig
from taft.train.loop import train

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

LINES = [f"{i % 2} sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(60)]


@pytest.fixture()
def data(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "d.txt").write_text("\n".join(LINES) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(LINES[:10]) + "\n")
    return tmp_path / "d.txt", tmp_path / "t.txt"


def _cfg(data, **kw) -> TrainConfig:
    d, t = data
    base = dict(model="tiny-bert", data=str(d), test_file=str(t), head_init="random", epochs=2, max_train=40,
                max_eval=8, batch_size=10, dp_epsilon=8.0, dp_delta=1e-3, lr=1e-2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(("kw", "match"), [
    ({"dp_epsilon": 0.0}, "dp_epsilon must be > 0"),
    ({"dp_epsilon": -2.0}, "dp_epsilon must be > 0"),
    ({"dp_epsilon": 1.0, "dp_delta": 1.0}, r"dp_delta must be in \(0, 1\)"),
    ({"dp_epsilon": 1.0, "dp_clip": 0.0}, "dp_clip must be > 0"),
    ({"dp_epsilon": 1.0, "method": "fc"}, "implemented for method taft and nlft"),
    ({"dp_epsilon": 1.0, "method": "lora"}, "implemented for method taft and nlft"),
    ({"dp_epsilon": 1.0}, "head_init=probe fits the head on the training data"),
    ({"dp_full_batch": True}, "set --dp-epsilon too"),
    ({"dp_epsilon": 1.0, "head_init": "zeros", "dp_accountant": "gdp"}, "dp_accountant='gdp' is not valid"),
])
def test_bad_private_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_delta_above_one_over_n_is_refused_before_features(data):
    with pytest.raises(ConfigError, match=r"larger than 1/N = 0.025 for N = 40"):
        train(_cfg(data, dp_delta=0.05), progress=False)


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_private_run_records_its_guarantee(data, tmp_path, method):
    out = tmp_path / "run"
    r = train(_cfg(data, method=method, output_dir=str(out)), progress=False)
    p = json.loads((out / "results.json").read_text())["privacy"]
    assert p == r.privacy
    assert 0 < p["epsilon"] <= p["target_epsilon"] == 8.0
    assert p["delta"] == 1e-3 and p["clip"] == 1.0 and p["accountant"] == "rdp" and p["n"] == 40
    assert p["sample_rate"] == pytest.approx(0.25) and p["steps"] == p["steps_taken"] == 8
    assert p["noise_multiplier"] > 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epsilon"] for x in rows] == sorted(x["epsilon"] for x in rows)  # ε grows with the steps taken
    assert rows[-1]["epsilon"] == pytest.approx(p["epsilon"])
    assert all("train_loss" not in x for x in rows)  # a statistic of the private data: not released
    assert r.epochs[-1]["delta_norm"] > 0


def test_full_batch_dp_gd_takes_one_step_per_epoch(data):
    r = train(_cfg(data, dp_full_batch=True, epochs=3), progress=False)
    assert r.privacy["sample_rate"] == 1.0 and r.privacy["steps"] == 3 and r.privacy["expected_batch_size"] == 40
    assert r.privacy["epsilon"] <= 8.0


def test_prv_accountant_run(data):
    r = train(_cfg(data, dp_accountant="prv", epochs=1), progress=False)
    assert r.privacy["accountant"] == "prv" and 0 < r.privacy["epsilon"] <= 8.0


def test_cli_trains_privately_and_refuses_bad_settings(data, tmp_path, capsys):
    d, t = data
    argv = ["train", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t), "--head-init", "zeros",
            "--epochs", "1", "--max-train", "20", "--max-eval", "8", "--batch-size", "5", "--dp-delta", "1e-3"]
    assert main([*argv, "--dp-epsilon", "3", "--dp-clip", "0.5", "--output-dir", str(tmp_path / "r")]) == 0
    assert "ε spent" in capsys.readouterr().out
    p = json.loads((tmp_path / "r" / "results.json").read_text())["privacy"]
    assert p["clip"] == 0.5 and p["epsilon"] <= 3.0
    assert main(["eval", str(tmp_path / "r"), "--json"]) == 0  # a private run folder is an ordinary run folder
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    assert acc == json.loads((tmp_path / "r" / "results.json").read_text())["test_acc"]
    assert main([*argv, "--dp-epsilon", "0"]) == 2
    assert "taft: error: dp_epsilon must be > 0" in capsys.readouterr().err
    assert main([*argv, "--dp-epsilon", "1", "--dp-delta", "0.5"]) == 2
    assert "larger than 1/N" in capsys.readouterr().err


def test_a_private_search_states_what_the_whole_search_spends(data, tmp_path):
    """Two candidates and one more seed, all trained on the same data: the search spends the sum of their ε."""
    from taft.train.search import search

    res = search(_cfg(data, epochs=1, output_dir=str(tmp_path / "s")), {"lr": [1e-2, 3e-2]}, [0, 1], progress=False)
    p = res.privacy
    assert p["runs"] == 3 and len(p["per_run_epsilon"]) == 3
    assert all(0 < e <= 8.0 for e in p["per_run_epsilon"])
    assert p["epsilon"] == pytest.approx(sum(p["per_run_epsilon"])) and p["epsilon"] > 8.0
    assert p["delta"] == pytest.approx(3e-3)
    assert json.loads((tmp_path / "s" / "search.json").read_text())["privacy"]["epsilon"] == pytest.approx(
        p["epsilon"])
    mixed = search(_cfg(data, epochs=1), {"dp_epsilon": [8.0, None]}, [0], progress=False).privacy
    assert mixed["epsilon"] == float("inf")  # a non-private candidate: no guarantee for the search
