"""Hyperparameter search: selection on validation only, the test split untouched until the choice is made."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import taft.train.loop as loop
import taft.train.search as search_mod
import taft.train.text as text_pipeline
from taft.cli import main
from taft.config import ConfigError, TrainConfig
from taft.data.text import default_data_root
from taft.train.search import DEFAULT_GRIDS, grid_points, parse_grid, search


def _root() -> Path:
    root = default_data_root()
    if root is None or not (Path(root) / "trec.train.txt").is_file():
        pytest.skip("shared/data/sentence-tasks not found beside the repo")
    return Path(root)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="tiny-bert", data="trec", data_root=str(_root()), max_train=48, max_eval=24, epochs=1,
                head_init="random", batch_size=16, output_dir=str(tmp_path / "s"))
    return TrainConfig(**{**base, **kw})


class _Guarded:
    """A dataset split that fails the test on any use while ``allowed[0]`` is False."""

    def __init__(self, ds, allowed):
        object.__setattr__(self, "_ds", ds)
        object.__setattr__(self, "_allowed", allowed)

    def __getattr__(self, name):
        if not self._allowed[0]:
            raise AssertionError(f"the test split was read during selection ({name})")
        return getattr(self._ds, name)

    def __len__(self):
        return self.__getattr__("__len__")()


def test_search_selects_on_validation_and_never_reads_test_before_choosing(tmp_path, monkeypatch):
    allowed = [False]
    real_load = text_pipeline.load_text_dataset

    def guarded_load(*a, **kw):
        splits = real_load(*a, **kw)
        return dataclasses.replace(splits, test=_Guarded(splits.test, allowed))

    real_train = search_mod.train

    def tracking_train(cfg, *, evaluate_test=True, **kw):
        allowed[0] = evaluate_test
        try:
            return real_train(cfg, evaluate_test=evaluate_test, **kw)
        finally:
            allowed[0] = False

    import taft.train.evaluate as ev

    real_eval = ev.evaluate_run

    def allowed_eval(*a, **kw):
        allowed[0] = True
        try:
            return real_eval(*a, **kw)
        finally:
            allowed[0] = False

    monkeypatch.setattr(text_pipeline, "load_text_dataset", guarded_load)
    monkeypatch.setattr(search_mod, "train", tracking_train)
    monkeypatch.setattr(ev, "evaluate_run", allowed_eval)

    cfg = _cfg(tmp_path)
    res = search(cfg, {"lr": [1e-4, 3e-2]}, seeds=[0, 1], progress=False)
    vals = [c.val_acc for c in res.candidates]
    assert res.chosen == res.candidates[vals.index(max(vals))].setting
    assert len(res.test_accs) == 2 and all(0 <= a <= 1 for a in res.test_accs)
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["chosen"] == res.chosen and saved["selected_on"] == "val"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["candidates", "search.json", "seed-1"]

    # the chosen candidate's test score is what a fresh run of that setting at that seed reports
    allowed[0] = True
    fresh = loop.train(dataclasses.replace(cfg, **res.chosen, output_dir=None), progress=False)
    assert fresh.test_acc == res.test_accs[0] and fresh.val_acc == res.val_accs[0]


def test_grid_parsing_is_typed_and_strict():
    assert parse_grid(["lr=1e-3,3e-3", "epochs=2,4", "head-init=probe,zero-shot"]) == {
        "lr": [1e-3, 3e-3], "epochs": [2, 4], "head_init": ["probe", "zero-shot"]}
    assert len(grid_points(parse_grid(["lr=1,2", "epochs=1,2,3"]))) == 6
    for bad in (["epochs=1.5"], ["bogus=1"], ["seed=1,2"], ["lr"], ["lr="]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_default_grids_give_every_method_the_same_budget():
    sizes = {m: len(grid_points(g)) for m, g in DEFAULT_GRIDS.items()}
    assert len(set(sizes.values())) == 1, sizes
    assert DEFAULT_GRIDS["taft"] == DEFAULT_GRIDS["nlft"]  # the headline comparison: the very same grid
    for method, grid in DEFAULT_GRIDS.items():  # every method's default lies strictly inside its grid
        assert min(grid["lr"]) < TrainConfig(method=method).lr < max(grid["lr"]), method


def test_single_model_defaults_are_the_validation_choice_of_the_committed_benchmark():
    """TAFT-1's and NLFT-1's default lr are what benchmarks/single_defaults.py chose on validation (the same grid
    for both, best mean over the five tasks), inside that grid (not at its edge), which is the default search grid."""
    res = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "single_defaults.json")
                     .read_text())
    assert sorted(res["grid"]) == DEFAULT_GRIDS["taft"]["lr"]
    for method in ("taft", "nlft"):
        chosen = res["methods"][method]["chosen_lr"]
        means = res["methods"][method]["mean_val"]
        assert chosen == max(sorted(map(float, means)), key=lambda lr: (means[str(lr)], -lr)), method
        assert TrainConfig(method=method).lr == chosen, method
        assert chosen in DEFAULT_GRIDS[method]["lr"], method
        assert min(res["grid"]) < chosen < max(res["grid"]), method  # a default at the grid's edge: widen the grid


def test_cli_search_and_its_errors(tmp_path, capsys):
    root = str(_root())
    common = ["--model", "tiny-bert", "--data", "trec", "--data-root", root, "--max-train", "32", "--max-eval",
              "16", "--epochs", "1", "--head-init", "random"]
    assert main(["search", *common, "--grid", "lr=1e-3,1e-2", "--seeds", "3",
                 "--output-dir", str(tmp_path / "s")]) == 0
    assert "test accuracy of the chosen setting" in capsys.readouterr().out
    assert main(["search", *common, "--grid", "lr=fast"]) == 2
    assert "lr must be a number, got 'fast'" in capsys.readouterr().err
    assert main(["search", *common, "--seeds", "0,x"]) == 2
    assert main(["search", *common, "--output-dir", str(tmp_path / "s")]) == 2  # not empty: never overwritten
    assert "not empty" in capsys.readouterr().err
