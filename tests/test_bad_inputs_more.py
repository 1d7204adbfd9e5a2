"""More bad inputs (issue #19), one test per class of bug: each bad value is one ``taft: error:`` line and exit 2
from ``taft.cli.main([...])``, refused before any expensive work, and the library function that owns the value
refuses it too. The suspicious-label case is a warning naming the line, not an error.

Training cases use tiny-bert on a 40-line file (:class:`tests.test_bad_inputs.Case`), so a case that wrongly got
through is still quick; the privacy cases run under an alarm, since the old calibration never returned."""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

import pytest
import torch

from taft.cli import main
from taft.config import ConfigError, TrainConfig
from tests.test_bad_inputs import Case, _write, assert_one_clean_error


@pytest.fixture(autouse=True)
def _scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a case that wrongly got through may only touch tmp_path


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so that taft.cli.main does not turn it into an error line."""


@pytest.fixture
def alarm():
    def ring(*_):
        raise Hung("still running after 60 s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def run(argv: list[str], capsys, needle: str) -> None:
    capsys.readouterr()
    assert_one_clean_error(main(argv), capsys.readouterr(), needle)


# -- a. taft eval --split ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["banana", "train", "TEST", "", "val,test"])
def test_eval_split_must_be_val_or_test(tmp_path, capsys, split):
    from taft.train.evaluate import evaluate_run

    run(["eval", str(tmp_path), "--split", split], capsys, "use val or test")
    with pytest.raises(ConfigError, match="use val or test"):
        evaluate_run(tmp_path, split=split)


# -- b. --device ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("device", "needle"), [
    ("gpu0", "device='gpu0' is not valid"),
    ("gpu", "device='gpu' is not valid"),
    ("cuda:007", "device='cuda:007' is not valid"),  # matched the old pattern; torch cannot parse it
    ("cuda:99999999999999999999", "is not valid"),
    ("cuda:-1", "is not valid"),
    ("CUDA", "is not valid"),
    ("cpu:0", "is not valid"),
    ("cuda:1", "no CUDA GPU"),
])
def test_device_strings(tmp_path, capsys, monkeypatch, device, needle):
    from taft.train.loop import resolve_device

    monkeypatch.setattr("taft.train.loop.prepare", lambda *a, **k: pytest.fail("data loaded before the device check"))
    run(Case(tmp_path).train("--device", device), capsys, needle)
    with pytest.raises(ConfigError, match=needle):  # the library function that owns device names
        resolve_device(device)


# -- c. counts --------------------------------------------------------------------------------------------------
def _no_training(monkeypatch):
    monkeypatch.setattr("taft.train.search.train", lambda *a, **k: pytest.fail("trained before the check"))


@pytest.mark.parametrize(("argv", "needle"), [
    (lambda c: c.train("--max-train", "0"), "max_train must be ≥ 1"),
    (lambda c: c.train("--max-train", "-5"), "max_train must be ≥ 1"),
    (lambda c: c.train("--max-eval", "-1"), "max_eval must be ≥ 1"),
    (lambda c: c.config("model: tiny-bert\nmax_train: 0\n"), "max_train must be ≥ 1"),
    (lambda c: ["search", *c.train("--grid", "max_train=16,0")[1:]], "grid max_train=0: max_train must be ≥ 1"),
    (lambda c: ["search", *c.train("--grid", "max_eval=-3,8")[1:]], "max_eval must be ≥ 1"),
    (lambda c: ["search", *c.train("--grid", "batch_size=8,0")[1:]], "batch_size must be ≥ 1"),
    (lambda c: ["search", *c.train("--grid", "lr=1e-3", "--seeds", "0,-1")[1:]], "--seeds -1: seed must be"),
], ids=["max-train-0", "max-train-neg", "max-eval-neg", "yaml-max-train-0", "search-grid-max-train-0",
        "search-grid-max-eval-neg", "search-grid-batch-0", "search-seed-neg"])
def test_counts_are_at_least_one_before_any_run(tmp_path, capsys, monkeypatch, argv, needle):
    _no_training(monkeypatch)
    run(argv(Case(tmp_path)), capsys, needle)


def test_search_refuses_a_bad_grid_value_before_the_first_candidate(tmp_path, monkeypatch):
    from taft.train.search import search

    _no_training(monkeypatch)
    c = Case(tmp_path)
    cfg = TrainConfig(model="tiny-bert", data=str(c.data), head_init="random", epochs=1)
    with pytest.raises(ConfigError, match="max_train must be ≥ 1"):
        search(cfg, {"max_train": [16, 0]})


# -- d. --dp-epsilon --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("eps", "needle"), [
    ("1e300", "no meaningful privacy"),
    ("1e20", "no meaningful privacy"),
    ("100.5", "omit --dp-epsilon"),
    ("inf", "finite number"),
    ("nan", "finite number"),
    ("0", "dp_epsilon must be > 0"),
    ("-1", "dp_epsilon must be > 0"),
])
def test_dp_epsilon_is_bounded(tmp_path, capsys, alarm, eps, needle):
    run(Case(tmp_path).train("--dp-epsilon", eps), capsys, needle)


@pytest.mark.parametrize("eps", [1e300, 1e20, 101.0, float("inf"), float("nan"), 0.0, -1.0])
def test_calibration_refuses_eps_without_privacy(alarm, eps):
    from taft.privacy.accounting import calibrate_noise, check_budget

    with pytest.raises(ConfigError, match="dp_epsilon"):
        check_budget(eps, 1e-5)
    with pytest.raises(ConfigError, match="dp_epsilon"):
        calibrate_noise(eps, 1e-5, sample_rate=0.5, steps=4)


def test_calibration_search_is_bounded(alarm, monkeypatch):
    """An accountant whose ε jumps from 0.5 to 10 at σ = 1 leaves no σ within the tolerance of ε = 5: the search
    (Opacus's, which looped forever on such a target) stops after its bounded bisection with a clear error."""
    from taft.privacy import accounting

    class Jumpy:
        history: list = []

        def get_epsilon(self, delta):
            return 10.0 if self.history[0][0] < 1.0 else 0.5

    monkeypatch.setattr(accounting, "_accountant", lambda name: Jumpy())
    with pytest.raises(ConfigError, match=r"did not get within 0\.01 of it in 64 bisection steps"):
        accounting.calibrate_noise(5.0, 1e-5, sample_rate=0.1, steps=10)


# -- e. data: invisible sentences, suspicious labels ------------------------------------------------------------
HEAD = "".join(f"{i % 2} sentence {i}\n" for i in range(2))  # lines 1-2
TAIL = "".join(f"{i % 2} sentence {i}\n" for i in range(2, 30))
CSV_HEAD = "text,label\nfirst,0\n"  # the bad row is line 3


@pytest.mark.parametrize(("name", "text"), [
    ("zwsp.txt", HEAD + "1 \u200b\u200b\u200b\n" + TAIL),
    ("joiners.txt", HEAD + "0 \u2060\u200d \ufeff\n" + TAIL),
    ("nbsp-zwsp.txt", HEAD + "1 \u00a0\u200b\n" + TAIL),
    ("hangul-filler.txt", HEAD + "0 \u3164\n" + TAIL),
    ("only-zwsp-line.txt", HEAD + "\u200b\n" + TAIL),
    ("zwsp.csv", CSV_HEAD + "\u200b\u200b,1\n" + "".join(f"row {i},{i % 2}\n" for i in range(30))),
    ("bidi.csv", CSV_HEAD + "\u200e\u200f \u2028,1\n" + "".join(f"row {i},{i % 2}\n" for i in range(30))),
    ("zwsp.jsonl", json.dumps({"text": "t", "label": 0}) + "\n" + json.dumps({"text": "x", "label": 1}) + "\n"
     + json.dumps({"text": "\u200b\t\u200b", "label": 1}) + "\n"
     + "".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(30))),
    ("zwsp-label.csv", CSV_HEAD + "fine,\u200b\n" + "".join(f"row {i},{'pos' if i % 2 else 'neg'}\n"
                                                          for i in range(30))),
])
def test_invisible_sentences_are_refused_with_file_and_line(tmp_path, capsys, name, text):
    data = _write(tmp_path / name, text)
    c = Case(tmp_path)
    capsys.readouterr()
    code = main(c.train(data=data, test=False))
    captured = capsys.readouterr()
    assert_one_clean_error(code, captured, "line 3")
    line = next(x for x in captured.err.splitlines() if x.startswith("taft: error:"))
    assert name in line
    assert "invisible" in line or "missing label" in line


def _label_task(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    """A folder task with its own dev and test files (no carve: the odd row stays in train, at line 2 + index)."""
    folder = tmp_path / "task"

    def csv(r):
        return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in r)

    _write(folder / "x.train.csv", csv(rows))
    _write(folder / "x.dev.csv", csv([("d1", "neg"), ("d2", "pos")]))
    _write(folder / "x.test.csv", csv([("t1", "neg"), ("t2", "pos")]))
    return folder


BASE = [(f"row {i}", "pos" if i % 2 else "neg") for i in range(30)]  # lines 2-31


@pytest.mark.parametrize(("odd", "line", "why"), [
    ("postive", 32, "occurs only once"),
    ("Pos", 32, "looks like 'pos'"),
    ("1", 32, "is a number while the other labels are words"),
    ("pos ", None, None),  # spaces around a label are not a new class
])
def test_suspicious_training_label_is_a_warning_naming_the_line(tmp_path, capsys, odd, line, why):
    from taft.data.formats import LabelWarning

    folder = _label_task(tmp_path, [*BASE, ("one more", odd)])
    argv = ["train", "--model", "tiny-bert", "--data", str(folder), "--head-init", "random", "--epochs", "1",
            "--batch-size", "8", "--max-eval", "4"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert code == 0, captured.err[-2000:]
    labels = [str(w.message) for w in seen if issubclass(w.category, LabelWarning)]
    if line is None:
        assert labels == []
        return
    assert len(labels) == 1, labels
    assert f"x.train.csv, line {line}: training label {odd!r}" in labels[0]
    assert why in labels[0] and "--num-classes" in labels[0] and "fix that line" in labels[0]


def test_declared_classes_make_the_typo_an_error_naming_the_line(tmp_path, capsys):
    folder = _label_task(tmp_path, [*BASE, ("one more", "postive")])
    run(["train", "--model", "tiny-bert", "--data", str(folder), "--num-classes", "2", "--head-init", "random"],
        capsys, "line 32")


def test_cli_prints_a_label_warning_as_one_taft_warning_line(tmp_path):
    import subprocess
    import sys

    folder = _label_task(tmp_path, [*BASE, ("one more", "postive")])
    code = ("import sys; from taft.cli import main; sys.exit(main(['train', '--model', 'tiny-bert', '--data', "
            f"{str(folder)!r}, '--head-init', 'random', '--epochs', '1', '--batch-size', '8', '--max-eval', '4', "
            "'--threads', '1']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if "postive" in ln]
    assert len(lines) == 1 and lines[0].startswith("taft: warning: ") and "line 32" in lines[0], proc.stderr[-2000:]
    assert "LabelWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
