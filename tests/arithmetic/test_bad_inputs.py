"""Bad inputs to ``taft arithmetic``: each is one ``taft: error:`` line and exit 2, before any model is loaded, and
the library functions behind the commands refuse them too (issue #19, items 6–9).

Task vectors are written directly (a few small tensors and a recorded training config), so no case trains or loads
a model when it is refused as it should be."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from taft.arithmetic import ArithmeticConfig, MultiTaskSuite, TaskVector, task_addition, task_negation
from taft.arithmetic.experiments import ADDITION_GRID, DISENTANGLE_GRID, MAX_GRID_POINTS, grid
from taft.arithmetic.suite import check_same_data
from taft.arithmetic.vectors import FORMAT, TaskVectorError, cosine_matrix, load_task_vector, save_task_vector
from taft.checkpoint import content_hashes
from taft.cli import main
from taft.config import ConfigError, from_dict
from taft.errors import TaftError


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(4, 3, generator=g), "layer.bias": torch.randn(4, generator=g)}


def _config(task: str, **kw) -> str:
    cfg = ArithmeticConfig(model="tiny-bert", tasks=task, max_train=16, max_eval=24, max_length=16, batch_size=8)
    return json.dumps(dataclasses.asdict(dataclasses.replace(cfg, **kw)))


def _vector(path: Path, task: str, tensor_seed: int = 1, **cfg) -> Path:
    tv = TaskVector(_tensors(tensor_seed), "linear-layers", "fp0", task, {"config": _config(task, **cfg)})
    return save_task_vector(tv, path)


def _raw_vector(path: Path, task: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A task-vector file written past save_task_vector's own check (consistent hashes, NaN/inf inside)."""
    meta = {"format": FORMAT, "taft_version": "0", "mode": "linear-layers", "task": task, "base_fingerprint": "fp0",
            "info": json.dumps({"config": _config(task)}), "content_sha256": json.dumps(content_hashes(tensors))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def _refused(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("taft: error:"), err
    assert "Traceback" not in err + captured.out
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def vecs(tmp_path) -> dict[str, Path]:
    return {"sst2": _vector(tmp_path / "sst2.safetensors", "sst2", 1),
            "mr": _vector(tmp_path / "mr.safetensors", "mr", 2)}


# -- 7: the α grid ------------------------------------------------------------------------------------------
BAD_STEPS = ["0.6", "1.5", "2", "inf", "nan", "0", "1e-9", "-0.1"]


@pytest.mark.parametrize("command", ["add", "negate"])
@pytest.mark.parametrize("step", BAD_STEPS)
def test_bad_alpha_step_is_one_error_line(tmp_path, capsys, vecs, command, step):
    out = tmp_path / "out"
    args = [str(vecs["sst2"]), str(vecs["mr"])] if command == "add" else [str(vecs["sst2"]), "--control", "mr"]
    _refused(capsys, ["arithmetic", command, *args, "--alpha-step", step, "--output-dir", str(out)], "--alpha-step")
    assert not out.exists()


@pytest.mark.parametrize("step", ["4", "7", "0", "nan", "1e-9"])
def test_bad_disentangle_step_is_one_error_line(tmp_path, capsys, vecs, step):
    out = tmp_path / "out"
    _refused(capsys, ["arithmetic", "disentangle", str(vecs["sst2"]), str(vecs["mr"]), "--alpha-step", step,
                      "--output-dir", str(out)], "--alpha-step")
    assert not out.exists()


def test_grid_points():
    g = grid(0.0, 1.0, 0.05)
    assert len(g) == 21 and g[0] == 0.0 and g[-1] == 1.0 and tuple(g) == ADDITION_GRID
    g = grid(0.0, 1.0, 0.1)
    assert len(g) == 11 and g[-1] == 1.0 and g[3] == 0.3 and g == [i / 10 for i in range(11)]
    assert grid(0.0, 1.0, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert grid(0.0, 1.0, 1.0) == [0.0, 1.0]
    assert grid(0.0, 1.0, 1 / 3)[-1] == 1.0 and len(grid(0.0, 1.0, 0.333333)) == 4  # divides up to rounding
    assert grid(-3.0, 3.0, 1.0) == list(DISENTANGLE_GRID) == [-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]
    assert grid(-3.0, 3.0, 3.0) == [-3.0, 0.0, 3.0]
    g = grid(-3.0, 3.0, 0.1)
    assert len(g) == 61 and g[1] == -2.9 and g[30] == 0.0 and g[-1] == 3.0
    assert len(grid(0.0, 1.0, 1 / (MAX_GRID_POINTS - 1))) == MAX_GRID_POINTS
    for step in (0.05, 0.1, 0.2, 1 / 3, 0.001):
        g = grid(0.0, 1.0, step)
        assert all(0.0 <= a <= 1.0 for a in g) and g == sorted(set(g)) and g[-1] == 1.0
        assert all(abs(b - a - step) < 1e-9 for a, b in zip(g, g[1:], strict=False))


@pytest.mark.parametrize(("step", "message"), [
    (0.6, "does not divide"),  # was 0, 0.6, 1.2
    (0.3, "e.g. 0.25 or 0.3333333333"),  # was 0, 0.3, 0.6, 0.9: α = 1 never tried
    (1.5, "at most 1"), (2.0, "at most 1"), (math.inf, "finite"), (math.nan, "finite"), (0.0, "> 0"),
    (-0.1, "> 0"), (1e-9, "at least 0.001"), (0.0009999, "at least 0.001"), (5e-324, "at least 0.001"),
])
def test_grid_refuses(step, message):
    with pytest.raises(ConfigError, match="step") as e:
        grid(0.0, 1.0, step)
    assert message in str(e.value)
    with pytest.raises(ConfigError, match="does not divide"):
        grid(-3.0, 3.0, 4.0)  # was -3, 1, 5


def test_experiments_refuse_non_finite_alphas_and_bad_threshold():
    tv = TaskVector(_tensors(1), "linear-layers", "fp0", "sst2")
    with pytest.raises(ConfigError, match="finite"):
        task_addition(None, [tv], alphas=[0.0, math.nan])
    with pytest.raises(ConfigError, match="finite"):
        task_addition(None, [tv], alphas=[])
    with pytest.raises(ConfigError, match="threshold"):
        task_negation(None, tv, "mr", threshold=2.0)


# -- 8: threshold, sample sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", ["-1", "2", "nan", "inf"])
def test_bad_threshold_is_one_error_line(tmp_path, capsys, vecs, threshold):
    out = tmp_path / "out"
    _refused(capsys, ["arithmetic", "negate", str(vecs["sst2"]), "--control", "mr", "--threshold", threshold,
                      "--output-dir", str(out)], "threshold", "[0, 1]")
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value"), [("--max-train", "-4"), ("--max-train", "0"), ("--max-eval", "0"),
                                             ("--max-test", "-1"), ("--seed", "-1")])
def test_bad_sample_size_is_one_error_line(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    _refused(capsys, ["arithmetic", "finetune", "--task", "sst2", "--model", "tiny-bert", flag, value,
                      "--output-dir", str(out)], flag[2:].replace("-", "_"))
    assert not out.exists()


@pytest.mark.parametrize("field", ["max_train", "max_eval", "max_test", "batch_size", "eval_batch_size",
                                   "max_length", "threads"])
def test_arithmetic_config_refuses_non_positive(field):
    for value in (0, -4):
        with pytest.raises(ConfigError, match=field):
            ArithmeticConfig(**{field: value})
    with pytest.raises(ConfigError, match=field):
        from_dict(ArithmeticConfig, {field: "many"})
    assert getattr(ArithmeticConfig(**{field: 3}), field) == 3


# -- 6: non-finite task vectors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("command", ["similarity", "add"])
def test_non_finite_vector_is_refused_on_load(tmp_path, capsys, vecs, bad, command):
    t = _tensors(3)
    t["layer.bias"][1] = bad
    path = _raw_vector(tmp_path / "bad.safetensors", "trec", t)
    out = tmp_path / "out"
    _refused(capsys, ["arithmetic", command, str(vecs["sst2"]), str(path), "--output-dir", str(out)],
             str(path), "layer.bias", "NaN or inf")
    assert not out.exists()
    with pytest.raises(TaskVectorError, match="layer.bias"):
        load_task_vector(path)


def test_non_finite_vector_in_memory_is_refused():
    t = _tensors(3)
    t["layer.weight"][0, 0] = math.nan
    good, bad = TaskVector(_tensors(1), "ntk", "fp0", "a"), TaskVector(t, "ntk", "fp0", "b")
    with pytest.raises(TaskVectorError, match="layer.weight"):
        cosine_matrix([good, bad])


# -- 9: vectors trained on other data ----------------------------------------------------------------------------
@pytest.mark.parametrize(("setting", "value"), [("seed", 1), ("max_length", 32), ("max_eval", 8),
                                                ("data_root", "/elsewhere")])
@pytest.mark.parametrize("mixed", [False, True])
def test_add_refuses_vectors_of_other_data(tmp_path, capsys, vecs, setting, value, mixed):
    other = _vector(tmp_path / "other.safetensors", "mr", 2, **{setting: value})
    out = tmp_path / "out"
    _refused(capsys, ["arithmetic", "add", str(vecs["sst2"]), str(other), *(["--allow-mixed"] if mixed else []),
                      "--output-dir", str(out)], setting, str(vecs["sst2"]), str(other))
    assert not out.exists()


def test_disentangle_refuses_vectors_of_other_seeds(tmp_path, capsys, vecs):
    other = _vector(tmp_path / "other.safetensors", "mr", 2, seed=7)
    _refused(capsys, ["arithmetic", "disentangle", str(vecs["sst2"]), str(other), "--output-dir",
                      str(tmp_path / "out")], "seed")


def test_check_same_data_and_suite_check():
    def tv(task, **kw):
        return TaskVector(_tensors(1), "ntk", "fp0", task, {"config": _config(task, **kw)})

    check_same_data([tv("a"), tv("b", max_train=500, batch_size=4)])  # no evaluation reads these
    check_same_data([tv("a", max_test=None), tv("b", max_test=24)])  # max_test defaults to max_eval (24)
    check_same_data([tv("a"), TaskVector(_tensors(2), "ntk", "fp0", "b")])  # an in-memory vector records none
    with pytest.raises(TaskVectorError, match="seed"):
        check_same_data([tv("a"), tv("b", seed=3)])
    suite = SimpleNamespace(seed=0, max_length=16, max_eval=24, max_test=24)
    MultiTaskSuite.check_vectors(suite, [tv("a")], "test")
    with pytest.raises(TaskVectorError, match="max_length"):
        MultiTaskSuite.check_vectors(suite, [tv("a", max_length=64)], "test")
    with pytest.raises(TaftError):
        task_addition(suite, [tv("a"), tv("b", seed=3)])
