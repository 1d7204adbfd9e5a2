"""taft shards search: the same grid for every method, the validation argmax chosen, the test split never read,
the chosen setting is what trains the store."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import taft.train.text as text_pipeline
from taft.cli import main
from taft.config import ConfigError, TrainConfig, store_config
from taft.shards import ShardStore
from taft.shards.search import DEFAULT_STORE_GRID, search_store

from .helpers import _cfg


class _Refused:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was read by the search ({name})")

    def __len__(self):
        raise AssertionError("the test split was read by the search (len)")


def test_search_keeps_the_validation_argmax_and_never_reads_test(data, tmp_path, monkeypatch):
    real_load = text_pipeline.load_text_dataset
    monkeypatch.setattr(text_pipeline, "load_text_dataset",
                        lambda *a, **k: dataclasses.replace(real_load(*a, **k), test=_Refused()))
    cfg = _cfg(data, method="taft")
    grid = {"lr": [1e-4, 1e-2, 3e-2], "min_steps": [None, 12]}
    out = search_store(cfg, 3, grid, progress=False, output=tmp_path / "s.json")
    vals = [c["val_composed"] for c in out["candidates"]]
    best = max(range(len(vals)), key=lambda i: (vals[i], -i))
    assert out["chosen"] == out["candidates"][best]["setting"] and out["val"] == vals[best]
    assert len(set(vals)) > 1, "every point scored the same: vacuous"
    assert json.loads((tmp_path / "s.json").read_text())["chosen"] == out["chosen"]
    vote = search_store(cfg, 3, grid, select="vote", progress=False)
    assert vote["val"] == max(c["val_vote"] for c in vote["candidates"])


def test_the_chosen_setting_trains_the_store(data, tmp_path):
    cfg = _cfg(data, method="nlft")
    out = search_store(cfg, 3, {"lr": [1e-3, 1e-2]}, store=tmp_path / "store", progress=False)
    with ShardStore(tmp_path / "store") as st:
        assert st.get_meta("config")["lr"] == out["chosen"]["lr"]


def test_default_grid_and_refusals(data, tmp_path, capsys):
    assert set(DEFAULT_STORE_GRID) == {"lr", "min_steps"}
    with pytest.raises(ConfigError, match="--select"):
        search_store(_cfg(data), 3, select="best", progress=False)
    with pytest.raises(ConfigError, match="lr"):
        search_store(_cfg(data), 3, {"lr": [-1.0]}, progress=False)
    d, t = data
    common = ["shards", "search", "--shards", "3", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t),
              "--head-init", "random", "--epochs", "1", "--batch-size", "8", "--threads", "1"]
    assert main([*common, "--grid", "lr=1e-3,1e-2", "--output", str(tmp_path / "o.json")]) == 0
    assert "chosen on validation" in capsys.readouterr().out
    assert main([*common, "--grid", "nope=1"]) == 2
    assert "taft: error:" in capsys.readouterr().err
    assert main([*common, "--head-init", "probe"]) == 2
    assert "must not depend on training examples" in capsys.readouterr().err


def test_cli_store_defaults_train_a_step_budget(data, tmp_path):
    """`taft shards train` without --min-steps trains each shard ≥ 100 steps (chosen on validation); 1 turns it off."""
    d, t = data
    common = ["shards", "train", "--shards", "2", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t),
              "--head-init", "random", "--epochs", "1", "--batch-size", "16", "--threads", "1"]
    assert main([*common, "--store", str(tmp_path / "a")]) == 0
    assert main([*common, "--store", str(tmp_path / "b"), "--min-steps", "1"]) == 0
    with ShardStore(tmp_path / "a") as a, ShardStore(tmp_path / "b") as b:
        assert a.get_meta("config")["min_steps"] == 100 and b.get_meta("config")["min_steps"] == 1
        fa, fb = (s.root / s.shard_row(0)["file"] for s in (a, b))
    from taft.checkpoint import read_delta

    da, db = read_delta(fa)[0], read_delta(fb)[0]
    assert any(not torch.equal(da[n], db[n]) for n in da), "the budget changed nothing: vacuous"


def test_cli_store_default_lr_is_the_validation_choice_for_taft_only(data, tmp_path):
    """`taft shards train` gives a TAFT store lr 3e-3 (benchmarks/results/shard_defaults.md) and --help says so; a
    typed --lr or one in --config wins; an NLFT store keeps the library's default."""
    d, t = data
    common = ["shards", "train", "--shards", "2", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t),
              "--head-init", "random", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--min-steps", "1"]
    (tmp_path / "c.yaml").write_text("lr: 0.01\n")
    runs = {"default": [], "typed": ["--lr", "1e-3"], "file": ["--config", str(tmp_path / "c.yaml")],
            "nlft": ["--method", "nlft"]}
    for name, more in runs.items():
        assert main([*common, *more, "--store", str(tmp_path / name)]) == 0, name
    lrs = {}
    for name in runs:
        with ShardStore(tmp_path / name) as st:
            lrs[name] = st.get_meta("config")["lr"]
    assert lrs == {"default": 3e-3, "typed": 1e-3, "file": 0.01, "nlft": 1e-3}  # nlft: the library default
    # the Python API's store_config gives the CLI's store, option for option
    with ShardStore(tmp_path / "default") as st:
        stored = st.get_meta("config")
    api = dataclasses.asdict(store_config(model="tiny-bert", data=str(d), test_file=str(t), head_init="random",
                                          epochs=1, batch_size=16, threads=1, min_steps=1))
    assert {k: stored[k] for k in api} == api
    assert (store_config().lr, store_config().min_steps, store_config().head_init) == (3e-3, 100, "zero-shot")
    assert store_config(method="nlft").lr == TrainConfig(method="nlft").lr
    from typer.testing import CliRunner

    from taft.cli import app

    shown = CliRunner().invoke(app, ["shards", "train", "--help"], env={"COLUMNS": "300"}).output
    assert "(default: 0.003 for taft, else by method)" in shown and "(default: 100)" in shown
