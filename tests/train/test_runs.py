"""Run folders are never lost or mixed: staged writes, overwrite, manifests, divergence, strict JSON, max_eval."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from taft.cli import main
from taft.config import TrainConfig
from taft.train.loop import TrainingDiverged, train
from taft.train.rundir import RunDirError, check_output_dir, verify_run

LINES = [f"{i % 2} sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(40)]
DEAD_PID = 99_999_999  # above any pid_max: never a live process


@pytest.fixture()
def data(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "d.txt").write_text("\n".join(LINES) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(LINES[:10]) + "\n")
    return tmp_path / "d.txt", tmp_path / "t.txt"


def _argv(data, out: Path, *extra: str) -> list[str]:
    d, t = data
    return ["train", "--model", "tiny-bert", "--data", str(d), "--test-file", str(t), "--head-init", "random",
            "--epochs", "1", "--max-train", "16", "--max-eval", "8", "--batch-size", "8", "--output-dir", str(out),
            *extra]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_run_is_complete_and_verified(data, tmp_path, capsys):
    out = tmp_path / "runs" / "a"
    assert main(_argv(data, out)) == 0
    manifest = verify_run(out)
    assert set(manifest["files"]) == {"config.yaml", "delta.safetensors", "metrics.jsonl", "results.json"}
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "run.json"])
    assert _hidden(out.parent) == []  # no staging folder left behind
    from taft.checkpoint import read_delta

    assert read_delta(out / "delta.safetensors")[1]["run_id"] == manifest["run_id"]


def test_existing_run_is_refused_unless_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(data, out)) == 0
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_argv(data, out, "--epochs", "2")) == 2
    assert "already holds a run" in capsys.readouterr().err and _snapshot(out) == before
    assert main(_argv(data, out, "--epochs", "2", "--overwrite")) == 0
    after = _snapshot(out)
    assert after["run.json"] != before["run.json"] and after["delta.safetensors"] != before["delta.safetensors"]
    assert len(after["metrics.jsonl"].splitlines()) == 2 and _hidden(tmp_path) == []
    verify_run(out)


def test_output_dir_is_checked_before_any_work(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("taft.train.loop.prepare", lambda *a, **k: pytest.fail("data and model loaded first"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for out, expect in ((data[0], "is a file"), (tmp_path / "other", "is not empty")):
        assert main(_argv(data, out)) == 2
        assert expect in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_failure_during_a_rerun_leaves_the_old_run_intact(data, tmp_path, monkeypatch, capsys):
    """kill -9 mid-rerun, simulated: training raises after the new config would have been written."""
    out = tmp_path / "run"
    assert main(_argv(data, out)) == 0
    before = _snapshot(out)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("taft.train.loop.fit", killed)
    assert main(_argv(data, out, "--epochs", "3", "--overwrite")) == 130
    assert _snapshot(out) == before and _hidden(tmp_path) == []
    verify_run(out)


def test_leftovers_of_a_dead_writer_are_recovered(data, tmp_path):
    """A crash between the two renames of an overwrite: the old run sits under its backup name."""
    out = tmp_path / "run"
    train(TrainConfig(model="tiny-bert", data=str(data[0]), head_init="random", epochs=1, max_train=16,
                      batch_size=8, output_dir=str(out)), progress=False)
    before = _snapshot(out)
    os.rename(out, tmp_path / f".run.old-{DEAD_PID}-abcd")
    (tmp_path / f".run.tmp-{DEAD_PID}-abcd").mkdir()
    with pytest.raises(RunDirError, match="already holds a run"):
        check_output_dir(out)
    assert _snapshot(out) == before and _hidden(tmp_path) == []


def test_mixed_folder_is_refused_by_eval(data, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(data, a)) == 0
    assert main(_argv(data, b, "--epochs", "2", "--seed", "1")) == 0
    capsys.readouterr()
    mixed = Path(shutil.copytree(a, tmp_path / "mixed"))
    shutil.copy(b / "delta.safetensors", mixed / "delta.safetensors")  # new Δw beside the old config
    assert main(["eval", str(mixed)]) == 2
    assert "delta.safetensors does not match run.json" in capsys.readouterr().err
    shutil.copy(b / "run.json", mixed / "run.json")  # and the new manifest: now the config does not match
    assert main(["eval", str(mixed)]) == 2
    assert "config.yaml does not match run.json" in capsys.readouterr().err


def test_stray_file_of_another_run_is_named(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(data, out)) == 0
    (out / "base_head.safetensors").write_bytes(b"left by an earlier run")
    capsys.readouterr()
    assert main(["eval", str(out)]) == 2
    assert "base_head.safetensors is not part of this run" in capsys.readouterr().err


def test_probe_run_keeps_its_base_head_and_evaluates(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(data, out, "--head-init", "probe", "--probe-epochs", "1")) == 0
    assert "base_head.safetensors" in verify_run(out)["files"]
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val", "--json"]) == 0
    recorded = json.loads((out / "results.json").read_text())
    assert json.loads(capsys.readouterr().out)["accuracy"] == recorded["val_acc"]


def test_diverged_loss_is_an_error_and_writes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(data, out, "--lr", "1e30", "--optimizer", "sgd")) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "epoch 1, step" in err and "Lower the learning rate" in err
    assert "Traceback" not in err
    assert not out.exists() and _hidden(tmp_path) == []
    with pytest.raises(TrainingDiverged, match="--probe-lr"):  # the probe says which rate to lower
        train(TrainConfig(model="tiny-bert", data=str(data[0]), head_init="probe", probe_lr=1e30, epochs=1,
                          max_train=16, batch_size=8), progress=False)


def test_results_json_is_strict(data, tmp_path, monkeypatch):
    monkeypatch.setattr("taft.train.loop.evaluate", lambda *a, **k: float("nan"))  # the final scores
    monkeypatch.setattr("taft.train.fit.evaluate", lambda *a, **k: float("nan"))  # each epoch's
    out = tmp_path / "run"
    train(TrainConfig(model="tiny-bert", data=str(data[0]), head_init="random", epochs=1, max_train=16,
                      batch_size=8, output_dir=str(out)), progress=False)

    def refuse(token):
        raise AssertionError(f"results.json holds {token}")

    res = json.loads((out / "results.json").read_text(), parse_constant=refuse)
    assert res["val_acc"] is None and res["epochs"][0]["val_acc"] is None
    json.loads((out / "metrics.jsonl").read_text().splitlines()[0], parse_constant=refuse)


def test_eval_honours_max_eval_and_says_so(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(data, out)) == 0  # max_eval 8 of 10 test lines
    recorded = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "test", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["examples"], ev["available"], ev["max_eval"]) == (8, 10, 8)
    assert ev["accuracy"] == recorded["test_acc"]
    assert main(["eval", str(out), "--split", "test"]) == 0
    assert "8 examples of 10: max_eval=8 from the run's config" in capsys.readouterr().out


def test_overwrite_replaces_a_folder_of_plain_files(data, tmp_path, capsys):
    out = tmp_path / "scratch"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    assert main(_argv(data, out, "--overwrite")) == 0
    assert not (out / "notes.txt").exists() and "run_id" in verify_run(out)


def test_unwritable_parent_is_refused_first(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("taft.train.loop.prepare", lambda *a, **k: pytest.fail("data and model loaded first"))
    monkeypatch.setattr("taft.train.rundir.os.access", lambda *a, **k: False)  # root ignores chmod
    assert main(_argv(data, tmp_path / "locked" / "run")) == 2
    assert "is not writable" in capsys.readouterr().err
