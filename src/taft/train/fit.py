"""The training step loop shared by every method: Δw trained on cached frozen-prefix features.

:func:`fit` runs the epochs (bucketed batches, the loss in float32, λ‖Δw‖², an optional ball projection, a
non-finite loss or Δw stops with :class:`TrainingDiverged`); :func:`end_epoch` records an epoch (the private loop in
:mod:`taft.privacy.fit` uses it too); :func:`evaluate` scores a model on cached features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from taft.config import TrainConfig
from taft.errors import TaftError
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache
from taft.train.distributed import Ranks, RankShard, current, held, sum_counts, sum_gradients
from taft.train.losses import make_loss, project_to_ball, squared_norm
from taft.train.rundir import finite_json
from taft.train.text import bucketed_batches


class TrainingDiverged(TaftError):
    """The loss or Δw became NaN / infinite; nothing is written."""


@dataclass
class RunResult:
    config: dict
    val_acc: float
    test_acc: float | None
    zero_shot_val_acc: float | None = None
    zero_shot_test_acc: float | None = None
    epochs: list[dict] = field(default_factory=list)
    trainable_params: int = 0
    cache_s: float = 0.0
    train_s: float = 0.0
    total_s: float = 0.0
    device: str = "cpu"
    output_dir: str | None = None
    num_classes: int = 0
    privacy: dict | None = None  # private runs: ε spent, δ, σ, C, accountant, steps, sampling rate (taft.privacy)
    data_digest: dict | None = None  # content hash of each split (taft.data.examples.split_digests), checked on reuse
    world_size: int = 1  # processes that trained it together (torchrun; taft.train.distributed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def evaluate(tm: TangentModel, cache: FeatureCache | RankShard, labels: torch.Tensor, batch_size: int,
             device) -> float:
    """Accuracy of ``tm`` on cached features (of a whole split; a rank's part of one under torchrun, its correct
    counts summed over the ranks)."""
    correct = 0
    local = cache.cache if isinstance(cache, RankShard) else cache
    rows = cache.owned if isinstance(cache, RankShard) else range(len(cache))  # global index of each local row
    lengths = local.lengths
    order = sorted(range(len(local)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        logits = tm.suffix(local.collate(idx, device))
        correct += int((logits.argmax(-1).cpu() == labels[[rows[i] for i in idx]]).sum())
    if isinstance(cache, RankShard):
        correct = int(sum_counts(correct)[0])
    return correct / max(len(cache), 1)


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = int(cfg.warmup * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(total - warm, 1)))
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
        return 1.0

    return f


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # the penalty is λ‖Δw‖², explicit
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def fit(cfg, tm, train_cache, train_labels, val_cache, val_ds, device, progress, result, out_dir,
         what: str = "training", lr_flag: str = "--lr") -> None:
    cfg = dataclasses.replace(cfg, epochs=cfg.epochs_for(len(train_cache)))  # min_steps: epochs for this data size
    delta = tm.delta_dict()
    opt = make_optimizer(cfg, list(delta.values()))
    g = torch.Generator().manual_seed(cfg.seed)
    lengths = train_cache.lengths
    steps = math.ceil(len(train_cache) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, steps))
    loss_fn = make_loss(cfg.loss, kappa=cfg.kappa, m=cfg.rsl_m)
    log = (out_dir / "metrics.jsonl").open("w") if out_dir else None
    ranks = current() if isinstance(train_cache, RankShard) else Ranks()  # a rank's part: reduce over the ranks
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        total, n = 0.0, 0
        bar = tqdm(bucketed_batches(lengths, cfg.batch_size, g), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for step, idx in enumerate(bar, 1):
            objective, value = _objective(cfg, tm, train_cache, train_labels, idx, loss_fn, delta, device, ranks)
            opt.zero_grad(set_to_none=True)
            if objective is not None:
                objective.backward()
            if ranks.many:  # the gradient of the global batch's objective, and its loss, on every rank
                value = sum_gradients(list(delta.values()), value)
            if not math.isfinite(value):
                hint = ", or use --optimizer adam" if cfg.optimizer == "sgd" else ""
                raise TrainingDiverged(
                    f"{what} diverged: the loss is {value} at epoch {epoch + 1}, step {step}; nothing was written. "
                    f"Lower the learning rate (now {lr_flag} {cfg.lr:g}){hint}")
            opt.step()
            sched.step()
            if cfg.radius is not None:
                project_to_ball(delta, cfg.radius)
            total += value * len(idx)
            n += len(idx)
            bar.set_postfix(loss=f"{total / n:.4f}")
        norm = float(squared_norm(delta).detach().sqrt())
        if not math.isfinite(norm):
            raise TrainingDiverged(f"{what} diverged: Δw is NaN or infinite after epoch {epoch + 1}; nothing was "
                                   f"written. Lower the learning rate ({lr_flag} {cfg.lr:g})")
        row = {"epoch": epoch + 1, "train_loss": total / n, "delta_norm": norm, "epoch_s": time.perf_counter() - t}
        end_epoch(row, tm, val_cache, val_ds, cfg, device, result, log, progress)
    if log:
        log.close()


def _objective(cfg, tm, cache, labels, idx, loss_fn, delta, device, ranks) -> tuple[torch.Tensor | None, float]:
    """This rank's share of a global batch's objective, and of its loss: the mean loss over the batch restricted to
    the examples this rank holds (``held / batch`` of their mean: the shares add up to the batch mean), and
    λ‖Δw‖² on rank 0 alone. In one process: the objective of the whole batch. ``None``: nothing to differentiate
    here (no example of this batch, and no penalty on this rank)."""
    mine = held(cache, idx)
    objective, value = None, 0.0
    if mine:
        logits = tm.suffix(cache.collate(mine, device))
        if logits.dtype in (torch.bfloat16, torch.float16):  # the loss in float32 (float64 stays float64)
            logits = logits.float()
        objective = loss_fn(logits, labels[mine].to(device))
        if len(mine) != len(idx):
            objective = objective * (len(mine) / len(idx))
        value = float(objective.detach())  # one sync per step, as for the running mean
    if cfg.penalty and ranks.main:
        penalty = cfg.penalty * squared_norm(delta)
        objective = penalty if objective is None else objective + penalty
    return objective, value


def end_epoch(row: dict, tm, val_cache, val_ds, cfg, device, result: RunResult, log, progress: bool) -> None:
    """An epoch's record (ordinary and private loops): validation accuracy added, kept in ``result``, appended to
    ``metrics.jsonl`` (strict JSON) and shown under the progress bar."""
    if val_cache is not None:
        row["val_acc"] = evaluate(tm, val_cache, val_ds.labels, cfg.eval_batch_size, device)
    result.epochs.append(row)
    if log:
        log.write(json.dumps(finite_json(row), allow_nan=False) + "\n")
        log.flush()
    if progress:
        tqdm.write(json.dumps(row))
