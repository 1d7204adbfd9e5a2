"""Run-folder wrappers (what ``taft arithmetic ...`` calls): each writes its outputs into a staged
:class:`~taft.train.rundir.RunFolder` that appears only when complete.

A task vector file records the :class:`ArithmeticConfig` it was trained under (``info["config"]``); the other
commands rebuild the suite from it, so the encoder, tokenization and data samples match, and the suite refuses
a vector whose base fingerprint differs.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from taft.arithmetic.experiments import (
    ADDITION_GRID,
    DISENTANGLE_GRID,
    check_alphas,
    check_threshold,
    disentanglement,
    task_addition,
    task_negation,
    tune,
)
from taft.arithmetic.plots import cosine_heatmap, disentanglement_heatmap
from taft.arithmetic.suite import ArithmeticConfig, MultiTaskSuite, check_same_data, vector_config
from taft.arithmetic.vectors import (
    TaskVector,
    TaskVectorError,
    check_same_origin,
    cosine_matrix,
    load_task_vector,
    save_task_vector,
)
from taft.config import ConfigError
from taft.train.rundir import RunFolder, finite_json, write_json

VECTOR_FILE = "task_vector.safetensors"


def _vector_path(p: str | Path) -> Path:
    p = Path(p)
    return p / VECTOR_FILE if p.is_dir() else p


def load_vectors(paths: Sequence[str | Path]) -> list[TaskVector]:
    """Task vectors from files or from ``taft arithmetic finetune`` folders (each checked finite on load)."""
    if not paths:
        raise TaskVectorError("no task vectors given")
    return [load_task_vector(_vector_path(p)) for p in paths]


def _config_for(vectors: Sequence[TaskVector], paths: Sequence[str | Path]) -> ArithmeticConfig:
    """The training config the suite is rebuilt from: the vectors' shared one. Vectors trained on other data
    settings (seed, files, token length, sample sizes) are refused, whatever ``allow_mixed`` says."""
    names = [f"{_vector_path(p)} ({v.task or 'unnamed'})" for p, v in zip(paths, vectors, strict=True)]
    cfgs = [vector_config(v, name) for v, name in zip(vectors, names, strict=True)]
    for cfg, name in zip(cfgs, names, strict=True):
        if cfg is None:
            raise TaskVectorError(f"task vector {name} records no training config; it was not written by "
                                  "`taft arithmetic finetune`")
    check_same_data(vectors, names)
    return cfgs[0]


def _suite_for(cfg: ArithmeticConfig, vectors: Sequence[TaskVector], extra_tasks: Sequence[str] = ()) -> MultiTaskSuite:
    tasks = list(dict.fromkeys([*(v.task for v in vectors), *extra_tasks]))
    return MultiTaskSuite.from_config(cfg, tasks)


def _write(folder: RunFolder, name: str, data: dict) -> None:
    write_json(folder.path / name, finite_json(data))


def finetune_run(cfg: ArithmeticConfig, task: str, mode: str, output_dir: str | Path, *,
                 lr: float | Sequence[float], epochs: int = 1, lengths: Sequence[float] | None = None,
                 overwrite: bool = False) -> dict:
    """Fine-tune one task vector; writes ``task_vector.safetensors`` and ``results.json`` (validation and test
    accuracy of the fine-tuned and the zero-shot model). Several learning rates and/or ``lengths`` (early-stopping
    points, in epochs, of the ``epochs``-long schedule): the point of the best validation accuracy is kept
    (:func:`~taft.arithmetic.experiments.tune`) and the whole validation grid recorded; test is read once, for it."""
    lrs = [float(lr)] if isinstance(lr, int | float) else [float(x) for x in lr]
    with RunFolder(output_dir, overwrite=overwrite) as folder:
        suite = MultiTaskSuite.from_config(cfg, [task])
        tr = tune(suite, task, mode, lrs=lrs, lengths=list(lengths) if lengths else [epochs], epochs=epochs,
                  seed=cfg.seed)
        tv = tr.vector
        tv.info["config"] = json.dumps(dataclasses.asdict(cfg))
        save_task_vector(tv, folder.path / VECTOR_FILE)
        out = {"task": task, "mode": mode, "lr": tr.lr, "epochs": tr.epochs, "schedule_epochs": epochs,
               "train_s": tr.train_s, "base_fingerprint": tv.base_fingerprint, "grid_val": tr.to_dict()["grid_val"],
               "val_acc": tr.val, "test_acc": suite.accuracy(mode, task, "test", [tv], [1.0]),
               **{f"zero_shot_{s}_acc": suite.accuracy(mode, task, s) for s in ("val", "test")}}
        _write(folder, "results.json", out)
        folder.commit(kind="arithmetic-finetune", task=task, mode=mode)
    return out


def addition_run(paths: Sequence[str | Path], output_dir: str | Path, *, alphas: Sequence[float] = ADDITION_GRID,
                 allow_mixed: bool = False, overwrite: bool = False) -> dict:
    alphas = check_alphas(alphas, "addition_run")
    vectors = load_vectors(paths)
    check_same_origin(vectors, allow_mixed=allow_mixed)
    cfg = _config_for(vectors, paths)
    with RunFolder(output_dir, overwrite=overwrite) as folder:
        res = task_addition(_suite_for(cfg, vectors), vectors, alphas=alphas, allow_mixed=allow_mixed).to_dict()
        _write(folder, "results.json", res)
        folder.commit(kind="arithmetic-add", mode=vectors[0].mode)
    return res


def negation_run(path: str | Path, control: str, output_dir: str | Path, *, alphas: Sequence[float] = ADDITION_GRID,
                 threshold: float = 0.95, overwrite: bool = False) -> dict:
    threshold = check_threshold(threshold, "negation_run")
    alphas = check_alphas(alphas, "negation_run")
    vectors = load_vectors([path])
    if control == vectors[0].task:
        raise TaskVectorError(f"the control task must differ from the target ({control}); name another task")
    cfg = _config_for(vectors, [path])
    with RunFolder(output_dir, overwrite=overwrite) as folder:
        res = task_negation(_suite_for(cfg, vectors, [control]), vectors[0], control, alphas=alphas,
                            threshold=threshold).to_dict()
        _write(folder, "results.json", res)
        folder.commit(kind="arithmetic-negate", mode=vectors[0].mode)
    return res


def disentangle_run(paths: Sequence[str | Path], output_dir: str | Path, *,
                    alphas: Sequence[float] = DISENTANGLE_GRID, points: int = 100, overwrite: bool = False) -> dict:
    alphas = check_alphas(alphas, "disentangle_run")
    if len(paths) != 2:
        raise TaskVectorError(f"disentangle takes two task vectors, got {len(paths)}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ConfigError(f"disentangle_run: points must be an integer ≥ 1, got {points!r}")
    vectors = load_vectors(paths)
    check_same_origin(vectors)
    cfg = _config_for(vectors, paths)
    with RunFolder(output_dir, overwrite=overwrite) as folder:
        d = disentanglement(_suite_for(cfg, vectors), vectors[0], vectors[1], alphas=alphas, points=points)
        disentanglement_heatmap(d, folder.path / "xi.png")
        disentanglement_heatmap(d, folder.path / "xi_rep.png", representation=True)
        res = d.to_dict()
        _write(folder, "results.json", res)
        folder.commit(kind="arithmetic-disentangle", mode=d.mode)
    return res


def similarity_run(paths: Sequence[str | Path], output_dir: str | Path, *, allow_mixed: bool = False,
                   overwrite: bool = False) -> dict:
    vectors = load_vectors(paths)
    check_same_origin(vectors, allow_mixed=allow_mixed)  # before the run folder is staged
    with RunFolder(output_dir, overwrite=overwrite) as folder:
        m = cosine_matrix(vectors, allow_mixed=allow_mixed)
        tasks = [v.task or f"#{i}" for i, v in enumerate(vectors)]
        cosine_heatmap(m, tasks, folder.path / "cosine.png", mode=vectors[0].mode)
        res = {"tasks": tasks, "mode": vectors[0].mode, "cosine": m}
        _write(folder, "results.json", res)
        folder.commit(kind="arithmetic-similarity", mode=vectors[0].mode)
    return res
