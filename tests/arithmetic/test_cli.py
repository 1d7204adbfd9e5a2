"""``taft arithmetic ...`` end to end on a tiny BERT and small samples of two real tasks."""

from __future__ import annotations

import json

import pytest

from taft.cli import main

SMALL = ["--model", "tiny-bert", "--max-train", "16", "--max-eval", "24", "--max-length", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    for task in ("sst2", "mr"):
        for mode in ("linear-layers", "ntk"):
            out = root / f"{task}-{mode}"
            assert main(["arithmetic", "finetune", "--task", task, "--mode", mode, "--lr", "1e-3", *SMALL,
                         "--output-dir", str(out)]) == 0
    return root


def test_finetune_writes_a_run_folder(runs):
    folder = runs / "sst2-linear-layers"
    res = json.loads((folder / "results.json").read_text())
    assert set(res) >= {"val_acc", "test_acc", "zero_shot_test_acc", "base_fingerprint"}
    manifest = json.loads((folder / "run.json").read_text())
    assert "task_vector.safetensors" in manifest["files"]


def test_add_negate_disentangle_similarity(runs, capsys):
    v = [str(runs / "sst2-linear-layers"), str(runs / "mr-linear-layers")]
    assert main(["arithmetic", "add", *v, "--alpha-step", "0.5", "--output-dir", str(runs / "add")]) == 0
    res = json.loads((runs / "add" / "results.json").read_text())
    assert res["alpha"] in (0.0, 0.5, 1.0) and set(res["test_abs"]) == {"sst2", "mr"}
    assert main(["arithmetic", "negate", v[0], "--control", "mr", "--alpha-step", "0.5",
                 "--output-dir", str(runs / "neg")]) == 0
    assert main(["arithmetic", "disentangle", *v, "--alpha-step", "3", "--points", "4",
                 "--output-dir", str(runs / "dis")]) == 0
    assert (runs / "dis" / "xi.png").stat().st_size > 0
    assert main(["arithmetic", "similarity", *v, "--output-dir", str(runs / "sim")]) == 0
    cos = json.loads((runs / "sim" / "results.json").read_text())["cosine"]
    assert cos[0][0] == cos[1][1] == 1.0 and cos[0][1] == cos[1][0]


def test_mixed_modes_refused(runs, capsys):
    v = [str(runs / "sst2-linear-layers"), str(runs / "mr-ntk")]
    assert main(["arithmetic", "add", *v, "--output-dir", str(runs / "mixed")]) == 2
    assert "different spaces" in capsys.readouterr().err
    assert not (runs / "mixed").exists()


def test_finetune_grid_keeps_the_validation_best(tmp_path):
    out = tmp_path / "grid"
    assert main(["arithmetic", "finetune", "--task", "trec", "--mode", "linear-layers", "--lr", "1e-3,1e-2",
                 "--epochs", "2", "--lengths", "1,2", *SMALL, "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    grid = {(lr, n): a for lr, row in res["grid_val"].items() for n, a in row.items()}
    assert set(grid) == {(lr, n) for lr in ("0.001", "0.01") for n in ("1.0", "2.0")}
    assert res["val_acc"] == max(grid.values()) == grid[(str(res["lr"]), str(res["epochs"]))]
    assert res["schedule_epochs"] == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "fast"], "--lr 'fast': write positive numbers"),
    (["--lr", "1e-3", "--lengths", "3"], "past the 1-epoch schedule"),
    (["--lr", "nan"], "--lr 'nan': write positive numbers"),
    (["--lr", "1e-3", "--lengths", "nan"], "--lengths 'nan'"),
    (["--lr", "1e-3", "--epochs", "2", "--lengths", "1.6,1.7"], "end at the same step"),
])
def test_finetune_bad_grid_is_one_error_line(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert main(["arithmetic", "finetune", "--task", "trec", *SMALL, *flags, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taft: error:") and message in err and "Traceback" not in err
    assert not out.exists()
