"""Hyperparameter search: a small grid per method, selected on the validation split, test scored once.

``search(cfg, grid, seeds)`` trains every grid point at ``cfg.seed`` without touching the test split, keeps
the point with the best validation accuracy (ties: the earlier point in grid order), scores that one run on
test, and trains the chosen setting at the other ``seeds`` (each scored on test) for mean ± std.
Every method gets a grid of the same size by default (:data:`DEFAULT_GRIDS`), so tables that compare methods
give each the same tuning budget.

Run folder layout when ``cfg.output_dir`` is set::

    OUT/search.json          grid, every candidate's validation accuracy, the choice, test per seed
    OUT/candidates/NN-…/     one run folder per grid point (seed = cfg.seed; test never evaluated)
    OUT/seed-S/              the chosen setting at each further seed S
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taft.config import ConfigError, TrainConfig, coerce_value
from taft.train.loop import RunResult, train
from taft.train.rundir import write_json

# The same number of points for every method (equal tuning budgets in every comparison), and the very same grid for
# the two methods every headline compares (TAFT and NLFT): the grid benchmarks/single_defaults.py chose their
# defaults from, with each default inside it.
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "taft": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "nlft": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "lora": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "adapter": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "fc": {"lr": [1e-3, 3e-3, 1e-2, 3e-2]},
}

@dataclass
class Candidate:
    setting: dict[str, Any]
    val_acc: float
    output_dir: str | None = None


@dataclass
class SearchResult:
    method: str
    grid: dict[str, list]
    candidates: list[Candidate]
    chosen: dict[str, Any]
    seeds: list[int]
    test_accs: list[float]
    val_accs: list[float]
    config: dict = field(default_factory=dict)  # the chosen full config at the selection seed
    runs: list[RunResult] = field(default_factory=list, repr=False)
    privacy: dict | None = None  # private searches: what the whole search spends (tuning_privacy)

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test_accs)

    @property
    def test_std(self) -> float:
        return statistics.stdev(self.test_accs) if len(self.test_accs) > 1 else 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "grid": self.grid, "chosen": self.chosen, "seeds": self.seeds,
                "val_accs": self.val_accs, "test_accs": self.test_accs, "test_mean": self.test_mean,
                "test_std": self.test_std, "selected_on": "val", "config": self.config,
                "candidates": [dataclasses.asdict(c) for c in self.candidates], "privacy": self.privacy}


def tuning_privacy(runs: list[RunResult]) -> dict | None:
    """What a search over private runs spends on the training data, by basic composition.

    Each run's (ε, δ) covers that run with its hyperparameters fixed in advance. The choice is made from the
    candidates' validation accuracy, a function of every candidate model, and the chosen model and its seed reruns
    are released with it: the released output is post-processing of all the runs trained on the same data, so
    its guarantee is Σε, Σδ over them (basic composition; private selection schemes such as Papernot & Steinke
    2022 do better, taft does not implement them). The validation split is read without privacy: it is not
    protected. ``None`` when no run was private; a mix of private and non-private runs has no guarantee."""
    private = [r.privacy for r in runs if r.privacy]
    if not private:
        return None
    n = len(runs)
    if len(private) < n:
        return {"runs": n, "private_runs": len(private), "epsilon": float("inf"), "delta": 1.0,
                "note": "some candidates were trained without privacy: the search has no privacy guarantee"}
    return {"runs": n, "per_run_epsilon": [p["epsilon"] for p in private],
            "epsilon": sum(p["epsilon"] for p in private), "delta": min(1.0, sum(p["delta"] for p in private)),
            "composition": "basic (sum over every run trained on the training data)",
            "note": "each run's ε covers that run alone; the chosen setting and model are released after looking "
                    "at all of them, so the search as a whole spends the sum; the validation split is not protected"}


def parse_grid(specs: list[str] | None) -> dict[str, list]:
    """``["lr=1e-3,3e-3", "epochs=5,10"]`` → ``{"lr": [0.001, 0.003], "epochs": [5, 10]}`` (typed per field)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list] = {}
    for spec in specs or []:
        name, eq, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not eq or not values.strip():
            raise ConfigError(f"grid {spec!r}: write FIELD=V1,V2,… (e.g. lr=1e-3,3e-3)")
        if name not in fields:
            raise ConfigError(f"grid {spec!r}: {name!r} is not a training option; valid: {sorted(fields)}")
        if name in ("seed", "output_dir", "data", "model", "method"):
            raise ConfigError(f"grid {spec!r}: {name} is not a hyperparameter (use --seeds for seeds)")
        grid[name] = [coerce_value(TrainConfig, name, v.strip()) for v in values.split(",")]
    return grid


def grid_points(grid: dict[str, list]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(grid[n] for n in names))]


def _slug(setting: dict[str, Any]) -> str:
    return "-".join(f"{k}={v}" for k, v in setting.items()).replace("/", "_") or "default"


def _check_settings(cfg: TrainConfig, grid: dict[str, list], seeds: list[int]) -> None:
    """Every configuration the search would train, built (hence validated) before the first run: a bad grid value
    or seed (``max_train=0``, ``seed=-1``) is refused up front, not after hours of the candidates before it."""
    for name, values in grid.items():
        if not values:
            raise ConfigError(f"search: grid {name} has no values")
        for value in values:
            try:
                dataclasses.replace(cfg, **{name: value})
            except ConfigError as e:
                raise ConfigError(f"search: grid {name}={value!r}: {e}") from e
    for point in grid_points(grid):  # options that are only bad together (lora_r with a scope, ...)
        try:
            dataclasses.replace(cfg, **point)
        except ConfigError as e:
            raise ConfigError(f"search: grid point {point}: {e}") from e
    for seed in seeds:
        try:
            dataclasses.replace(cfg, seed=seed)
        except ConfigError as e:
            raise ConfigError(f"search: --seeds {seed}: {e}") from e


def search(cfg: TrainConfig, grid: dict[str, list] | None = None, seeds: list[int] | None = None, *,
           progress: bool = True, caches: dict | None = None) -> SearchResult:
    """Select ``grid`` on validation at ``seeds[0]``, then score the choice on test at every seed in ``seeds``.

    Cost: ``len(grid_points) + len(seeds) - 1`` training runs (the selected candidate is re-scored, not
    re-trained). ``caches`` shares frozen-prefix features between all of them."""
    grid = dict(grid) if grid else dict(DEFAULT_GRIDS.get(cfg.method, {}))
    if not grid:
        raise ConfigError(f"search: method {cfg.method!r} has no default grid; pass one (e.g. --grid lr=1e-3,3e-3)")
    seeds = list(seeds) if seeds else [cfg.seed]
    cfg = dataclasses.replace(cfg, seed=seeds[0])  # the first seed selects
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"search: seeds {seeds} repeat a value")
    _check_settings(cfg, grid, seeds)
    caches = {} if caches is None else caches
    out = Path(cfg.output_dir) if cfg.output_dir else None
    with tempfile.TemporaryDirectory(prefix="taft-search-") as scratch:
        root = out if out is not None else Path(scratch)
        if out is not None and out.exists() and any(out.iterdir()):
            raise ConfigError(f"search: output folder {out} is not empty; choose a new --output-dir")
        cand_dir = root / "candidates"
        candidates: list[Candidate] = []
        runs: dict[int, RunResult] = {}
        for i, setting in enumerate(grid_points(grid)):
            c = dataclasses.replace(cfg, **setting, output_dir=str(cand_dir / f"{i:02d}-{_slug(setting)}"))
            r = train(c, progress=progress, caches=caches, evaluate_test=False)
            if not math.isfinite(r.val_acc):
                raise ConfigError(f"search: {cfg.data} has no validation split to select on")
            candidates.append(Candidate(setting, r.val_acc, c.output_dir))
            runs[i] = r
        best = max(range(len(candidates)), key=lambda i: (candidates[i].val_acc, -i))
        chosen = candidates[best].setting
        test_accs, val_accs, seed_runs = [], [], []
        for seed in seeds:
            if seed == cfg.seed:  # the selected candidate itself: scored on test once, from its run folder
                from taft.train.evaluate import evaluate_run

                res = evaluate_run(candidates[best].output_dir, split="test")
                r = dataclasses.replace(runs[best], test_acc=res["accuracy"])
            else:
                c = dataclasses.replace(cfg, **chosen, seed=seed,
                                        output_dir=str(root / f"seed-{seed}") if out is not None else None)
                r = train(c, progress=progress, caches=caches)
            test_accs.append(r.test_acc)
            val_accs.append(r.val_acc)
            seed_runs.append(r)
        trained = [*runs.values(), *(r for seed, r in zip(seeds, seed_runs, strict=True) if seed != cfg.seed)]
        result = SearchResult(cfg.method, grid, candidates, chosen, seeds, test_accs, val_accs,
                              config=runs[best].config, runs=seed_runs, privacy=tuning_privacy(trained))
        if out is None:
            for c in result.candidates:
                c.output_dir = None
        else:
            write_json(out / "search.json", result.to_dict())
    return result

