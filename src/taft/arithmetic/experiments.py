"""Task addition, task negation and weight disentanglement over a :class:`MultiTaskSuite`.

The selection rules are plain functions of accuracies (:func:`normalized_accuracy`, :func:`choose_addition_alpha`,
:func:`choose_negation_alpha`); the experiment functions evaluate a grid on validation, pick α there and read the
test split once, at the chosen α (``evaluate_test=False``: never).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from taft.arithmetic.suite import MultiTaskSuite, check_same_data
from taft.arithmetic.vectors import TaskVector, TaskVectorError, check_same_origin, combine
from taft.config import ConfigError
from taft.train.fit import TrainingDiverged

ADDITION_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1
DISENTANGLE_GRID = tuple(float(a) for a in range(-3, 4))       # [-3, 3], step 1


MAX_GRID_POINTS = 1001  # a grid search evaluates every point on every task: more is a typo, not a search


def grid(start: float, stop: float, step: float, *, name: str = "step") -> list[float]:
    """``start, start + step, ..., stop``: evenly spaced, both ends included, never outside ``[start, stop]``.

    ``step`` must be finite, > 0 and divide ``stop − start`` (up to float rounding, 1e-5 relative: 0.1 on [0, 1]
    gives 11 points ending at exactly 1.0), and the grid hold at most :data:`MAX_GRID_POINTS` points. A step that
    does not divide the range (0.3 on [0, 1]) is refused rather than ending the grid short of ``stop`` (0.9: α = 1,
    the plain sum, never tried) or past it (0.6 once gave 1.2); the message names the nearest steps that do.
    Anything wrong is a :class:`ConfigError` naming ``name`` (the CLI passes its flag)."""
    start, stop, step = float(start), float(stop), float(step)
    if not (math.isfinite(start) and math.isfinite(stop) and start < stop):
        raise ConfigError(f"grid over [{start:g}, {stop:g}]: needs finite bounds with start < stop")
    span = stop - start
    where = f"the grid over [{start:g}, {stop:g}]"
    if not (math.isfinite(step) and 0 < step <= span):
        raise ConfigError(f"{name} {step:g}: {where} needs a finite step > 0 and at most {span:g} that divides "
                          f"{span:g}, e.g. {span / 20:g}")
    ratio = span / step  # intervals; checked before any list is built (a tiny step must not eat the memory)
    if not ratio < MAX_GRID_POINTS - 1 + 1e-5 * MAX_GRID_POINTS:  # also inf, for a subnormal step
        raise ConfigError(f"{name} {step:g}: {where} would take {ratio:.6g} steps, more than the "
                          f"{MAX_GRID_POINTS - 1} allowed ({MAX_GRID_POINTS} points); use a step of at least "
                          f"{span / (MAX_GRID_POINTS - 1):g}")
    n = max(round(ratio), 1)
    if abs(ratio - n) > 1e-5 * n:
        lo, hi = math.floor(ratio), math.ceil(ratio)
        options = " or ".join(f"{span / k:.10g}" for k in (hi, lo) if 1 <= k <= MAX_GRID_POINTS - 1)
        raise ConfigError(f"{name} {step:g} does not divide {where} evenly (it would end at "
                          f"{start + lo * step:g}, not {stop:g}); use a step that does, e.g. {options}")
    # i/n of the range: the endpoints come out exact and 0.1-steps read 0.3, not 0.30000000000000004
    points = [min(max(float(f"{start + span * i / n:.12g}"), start), stop) for i in range(n + 1)]
    points[0], points[-1] = start, stop
    return points


def check_alphas(alphas: Sequence[float], who: str) -> list[float]:
    """The coefficients of a grid search as floats: at least one, every one finite (NaN would score as any α)."""
    values = [float(a) for a in alphas]
    if not values or not all(math.isfinite(a) for a in values):
        raise ConfigError(f"{who}: needs one or more finite α values, got {values}; build them with grid()")
    return values


def check_threshold(threshold: float, who: str = "task_negation") -> float:
    """The control task's kept fraction of its zero-shot accuracy: a finite number in [0, 1]."""
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise ConfigError(f"{who}: threshold {threshold!r} is the fraction of the control task's zero-shot accuracy "
                          "to keep; use a number in [0, 1], e.g. 0.95")
    return t


# -- pure selection rules ---------------------------------------------------------------------------------
def normalized_accuracy(merged: Mapping[str, float], single: Mapping[str, float]) -> dict[str, float]:
    """Per task: merged-model accuracy ÷ the same mode's single-task fine-tuned accuracy."""
    missing = sorted(set(merged) - set(single))
    if missing:
        raise TaskVectorError(f"normalized_accuracy: no single-task accuracy for {missing}")
    if any(single[t] <= 0 for t in merged):
        raise TaskVectorError("normalized_accuracy: a single-task accuracy of 0 cannot normalize")
    return {t: merged[t] / single[t] for t in merged}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def choose_addition_alpha(val_by_alpha: Mapping[float, Mapping[str, float]], single_val: Mapping[str, float]) -> float:
    """The α of the highest average normalized validation accuracy (the smallest α on ties)."""
    scored = [(mean(normalized_accuracy(accs, single_val).values()), -a, a) for a, accs in val_by_alpha.items()]
    return max(scored)[2]


def choose_negation_alpha(target_by_alpha: Mapping[float, float], control_by_alpha: Mapping[float, float],
                          control_zero_shot: float, threshold: float = 0.95) -> float:
    """The α of the lowest target accuracy among those keeping the control task at ≥ ``threshold`` × its
    zero-shot accuracy (the smallest α on ties; 0 — no edit — when no α qualifies)."""
    threshold = check_threshold(threshold, "choose_negation_alpha")
    ok = [(target_by_alpha[a], a) for a in target_by_alpha if control_by_alpha[a] >= threshold * control_zero_shot]
    return min(ok)[1] if ok else 0.0


# -- experiments ------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """The (lr, length) of the best single-task validation accuracy and its vector; ``grid_val[lr][length]`` is
    ``None`` where the run diverged. ``vectors`` holds τ at every grid point."""

    task: str
    mode: str
    lr: float
    epochs: float
    val: float
    vector: TaskVector
    grid_val: dict[float, dict[float, float | None]]
    vectors: dict[tuple[float, float], TaskVector]
    train_s: float

    def best_at(self, lr: float) -> tuple[float, float] | None:
        """``(validation accuracy, length)`` of the best length at ``lr`` (the shorter on ties); None if it diverged."""
        return _best_length(self.grid_val[lr])

    def to_dict(self) -> dict:
        return {"task": self.task, "mode": self.mode, "lr": self.lr, "epochs": self.epochs, "val": self.val,
                "train_s": self.train_s,
                "grid_val": {str(lr): {str(n): a for n, a in row.items()} for lr, row in self.grid_val.items()}}


def _best_length(row: Mapping[float, float | None]) -> tuple[float, float] | None:
    scored = [(a, n) for n, a in sorted(row.items()) if a is not None]
    return max(scored, key=lambda x: x[0]) if scored else None


def tune(suite: MultiTaskSuite, task: str, mode: str, *, lrs: Sequence[float], lengths: Sequence[float],
         epochs: int | None = None, seed: int | None = None) -> TuneResult:
    """Learning rate and training length chosen jointly on ``task``'s validation split (test never read).

    One run per lr with the schedule over ``epochs`` (default ``ceil(max(lengths))``), τ kept at every length
    (early-stopping points of that schedule, :meth:`MultiTaskSuite.finetune`); the best single-task validation
    accuracy wins, the earlier grid point (in the order of ``lrs``, then the shorter) on ties. A diverged lr is
    recorded and skipped."""
    if not lrs or not lengths or not all(math.isfinite(x) and x > 0 for x in [*lrs, *lengths]):
        raise ConfigError(f"tune: needs positive learning rates and lengths, got lrs={list(lrs)}, "
                          f"lengths={list(lengths)}")
    lengths = sorted(float(n) for n in lengths)
    epochs = math.ceil(lengths[-1]) if epochs is None else epochs
    if lengths[-1] > epochs:
        raise ConfigError(f"a length of {lengths[-1]:g} epochs is past the {epochs}-epoch schedule; raise --epochs "
                          "or drop that length")
    grid_val: dict[float, dict[float, float | None]] = {}
    vectors: dict[tuple[float, float], TaskVector] = {}
    train_s, best = 0.0, None
    for lr in lrs:
        try:
            ft = suite.finetune(task, mode, lr=lr, epochs=epochs, checkpoints=lengths, seed=seed)
        except TrainingDiverged:
            grid_val[lr] = dict.fromkeys(lengths)
            continue
        train_s += ft.train_s
        vectors.update({(lr, n): ft.checkpoints[n] for n in lengths})
        grid_val[lr] = {n: suite.accuracy(mode, task, "val", [ft.checkpoints[n]], [1.0]) for n in lengths}
        acc, n = _best_length(grid_val[lr])
        if best is None or acc > best[0]:  # strictly: the earlier lr on ties
            best = (acc, lr, n)
    if best is None:
        raise TrainingDiverged(f"fine-tuning {mode} on {task} diverged at every learning rate {list(lrs)}; "
                               "try smaller ones")
    acc, lr, n = best
    return TuneResult(task, mode, lr, n, acc, vectors[(lr, n)], grid_val, vectors, train_s)


@dataclass
class AdditionResult:
    mode: str
    tasks: list[str]
    alpha: float
    val_by_alpha: dict[float, dict[str, float]]
    val_normalized: float
    single_val: dict[str, float]
    test_abs: dict[str, float] | None = None
    test_normalized: dict[str, float] | None = None
    single_test: dict[str, float] | None = None

    @property
    def abs_mean(self) -> float | None:
        return None if self.test_abs is None else mean(self.test_abs.values())

    @property
    def normalized_mean(self) -> float | None:
        return None if self.test_normalized is None else mean(self.test_normalized.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["val_by_alpha"] = {str(a): v for a, v in self.val_by_alpha.items()}
        d["abs_mean"], d["normalized_mean"] = self.abs_mean, self.normalized_mean
        return d


def single_task_accuracy(suite: MultiTaskSuite, vectors: Sequence[TaskVector], split: str) -> dict[str, float]:
    """Each vector's own task at α = 1 (the fine-tuned model)."""
    return {v.task: suite.accuracy(v.mode, v.task, split, [v], [1.0]) for v in vectors}


def task_addition(suite: MultiTaskSuite, vectors: Sequence[TaskVector], *, alphas: Sequence[float] = ADDITION_GRID,
                  evaluate_test: bool = True, allow_mixed: bool = False) -> AdditionResult:
    """One α for ``Σ τ_t``, chosen on validation by average normalized accuracy; test read once, at that α."""
    check_same_origin(vectors, allow_mixed=allow_mixed)
    alphas = check_alphas(alphas, "task_addition")
    mode, tasks = vectors[0].mode, [v.task for v in vectors]
    if len(set(tasks)) != len(tasks):
        raise TaskVectorError(f"task_addition: one vector per task, got {tasks}")
    check_same_data(vectors)  # never waived by allow_mixed: validation must not overlap any vector's training data
    suite.check_vectors(vectors, "task_addition")
    single_val = single_task_accuracy(suite, vectors, "val")
    # α·Στ, one vector: a tangent-space model then needs one J·v pass per split instead of one per task vector
    total = TaskVector(combine(vectors, 1.0, allow_mixed=allow_mixed), mode, vectors[0].base_fingerprint, "sum")
    val_by_alpha = {a: {t: suite.accuracy(mode, t, "val", [total], [a], allow_mixed=allow_mixed) for t in tasks}
                    for a in alphas}
    alpha = choose_addition_alpha(val_by_alpha, single_val)
    res = AdditionResult(mode, tasks, alpha, val_by_alpha,
                         mean(normalized_accuracy(val_by_alpha[alpha], single_val).values()), single_val)
    if evaluate_test:
        res.single_test = single_task_accuracy(suite, vectors, "test")
        res.test_abs = {t: suite.accuracy(mode, t, "test", [total], [alpha], allow_mixed=allow_mixed) for t in tasks}
        res.test_normalized = normalized_accuracy(res.test_abs, res.single_test)
    return res


@dataclass
class NegationResult:
    mode: str
    target: str
    control: str
    threshold: float
    alpha: float
    control_zero_shot_val: float
    val_target: dict[float, float]
    val_control: dict[float, float]
    test: dict[str, float] | None = None  # target/control accuracy at 0 (zero-shot) and at the chosen α

    def to_dict(self) -> dict:
        d = asdict(self)
        d["val_target"] = {str(a): v for a, v in self.val_target.items()}
        d["val_control"] = {str(a): v for a, v in self.val_control.items()}
        return d


def task_negation(suite: MultiTaskSuite, vector: TaskVector, control: str, *, alphas: Sequence[float] = ADDITION_GRID,
                  threshold: float = 0.95, evaluate_test: bool = True) -> NegationResult:
    """``w0 − α·τ_target``: the α (on validation) that lowers the target most while the control task keeps
    ≥ ``threshold`` of its zero-shot accuracy."""
    if control == vector.task:
        raise TaskVectorError("task_negation: the control task must differ from the target")
    threshold = check_threshold(threshold)
    alphas = check_alphas(alphas, "task_negation")
    check_same_origin([vector])
    suite.check_vectors([vector], "task_negation")
    mode, target = vector.mode, vector.task
    zs_control = suite.accuracy(mode, control, "val")
    vt = {a: suite.accuracy(mode, target, "val", [vector], [-a]) for a in alphas}
    vc = {a: suite.accuracy(mode, control, "val", [vector], [-a]) for a in alphas}
    alpha = choose_negation_alpha(vt, vc, zs_control, threshold)
    res = NegationResult(mode, target, control, threshold, alpha, zs_control, vt, vc)
    if evaluate_test:
        res.test = {"target_zero_shot": suite.accuracy(mode, target, "test"),
                    "control_zero_shot": suite.accuracy(mode, control, "test"),
                    "target": suite.accuracy(mode, target, "test", [vector], [-alpha]),
                    "control": suite.accuracy(mode, control, "test", [vector], [-alpha])}
    return res


@dataclass
class DisentanglementResult:
    mode: str
    tasks: tuple[str, str]
    alphas: list[float]
    xi: list[list[float]]      # prediction disagreement, summed over both tasks; xi[i][j] at (alphas[i], alphas[j])
    xi_rep: list[list[float]]  # mean squared distance of the embeddings, summed over both tasks
    points: int

    def to_dict(self) -> dict:
        return asdict(self)


def disentanglement(suite: MultiTaskSuite, v1: TaskVector, v2: TaskVector, *,
                    alphas: Sequence[float] = DISENTANGLE_GRID, points: int = 100,
                    split: str = "test") -> DisentanglementResult:
    """Weight disentanglement error ξ(α1, α2) = Σ_t E_{x∈D_t}[δ(f(x; α1τ1 + α2τ2), f(x; α_tτ_t))] on ``points``
    examples per task: δ = prediction disagreement (``xi``) and squared embedding distance (``xi_rep``)."""
    check_same_origin([v1, v2])
    alphas = check_alphas(alphas, "disentanglement")
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ConfigError(f"disentanglement: points is the number of sentences per task; use an integer ≥ 1, "
                          f"got {points!r}")
    check_same_data([v1, v2])
    suite.check_vectors([v1, v2], "disentanglement")
    mode, vs = v1.mode, (v1, v2)
    n = len(alphas)
    xi = [[0.0] * n for _ in range(n)]
    xi_rep = [[0.0] * n for _ in range(n)]
    for k, v in enumerate(vs):
        t = v.task
        single = {a: suite.outputs(mode, t, split, [v], [a], limit=points) for a in alphas}
        for i, a1 in enumerate(alphas):
            for j, a2 in enumerate(alphas):
                z = suite.outputs(mode, t, split, vs, [a1, a2], limit=points)
                ref = single[(a1, a2)[k]]
                pred, pred_ref = suite.logits(z, t).argmax(-1), suite.logits(ref, t).argmax(-1)
                xi[i][j] += float((pred != pred_ref).float().mean())
                xi_rep[i][j] += float(((z - ref) ** 2).sum(-1).mean())
    return DisentanglementResult(mode, (v1.task, v2.task), list(alphas), xi, xi_rep,
                                 int(suite.labels(mode, v1.task, split, points).numel()))

