"""The private training loop (DP-SGD or full-batch DP-GD on Δw), called by ``taft.train.loop`` for runs with
``dp_epsilon`` set.

What is private: the training split. The frozen prefix is the public pretrained network run on each example; its
cached features are a deterministic function of one example and public weights, so computing them costs nothing,
and everything the run releases (Δw, per-epoch validation accuracy, results) is post-processing of the noisy
gradients. The training loss is not logged (it is a statistic of the private data). Validation examples are
separate from training examples; choosing hyperparameters on them is not accounted for (the common practice).

Planning happens before any feature is computed (:func:`plan_private_run`): N, the sampling rate, the number of
steps and the calibrated σ, refusing settings that cannot meet the target.

Under torchrun (:mod:`taft.train.distributed`) the plan is the global one (N, q, steps, σ: the same ε), every rank
draws the same global Poisson sample, clips the examples of it it holds, and the clipped sums are all-reduced before
the noise, drawn once per step from the same seeded generator on every rank, is added
(:func:`taft.privacy.optimizer.sum_over_ranks`): the step of one process, whatever the number of ranks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from taft.config import ConfigError, TrainConfig
from taft.privacy.accounting import calibrate_noise, check_budget, epsilon_spent
from taft.privacy.ghost import clipped_sum
from taft.privacy.grad_sample import nonlinear_twin, per_example_grads
from taft.privacy.optimizer import DPOptimizer, sum_over_ranks
from taft.train.distributed import RankShard, held
from taft.train.loop import register_private_training
from taft.train.losses import make_loss, project_to_ball, squared_norm


@dataclass
class PrivacyPlan:
    """The privacy parameters of one run; ``to_dict`` (with the ε spent) goes to results.json."""

    target_epsilon: float
    delta: float
    clip: float
    accountant: str
    full_batch: bool
    n: int
    expected_batch_size: float
    sample_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float
    epsilon: float  # spent by the planned steps (≤ target_epsilon)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_private_run(cfg: TrainConfig, n: int) -> PrivacyPlan:
    """Sampling rate, steps and σ for ``cfg`` on ``n`` training examples; :class:`ConfigError` when the target
    cannot be met (δ > 1/N, or no σ reaches ε in these steps)."""
    if cfg.dp_epsilon is None:
        raise ConfigError("plan_private_run: dp_epsilon is not set")
    if n < 1:
        raise ConfigError("a private run needs at least one training example")
    check_budget(cfg.dp_epsilon, cfg.dp_delta, n)
    if cfg.dp_full_batch:
        batch, steps_per_epoch = float(n), 1
    else:
        batch = float(min(cfg.batch_size, n))
        steps_per_epoch = math.ceil(n / batch)
    q = batch / n
    steps = cfg.epochs_for(n) * steps_per_epoch
    sigma = calibrate_noise(cfg.dp_epsilon, cfg.dp_delta, sample_rate=q, steps=steps, accountant=cfg.dp_accountant)
    spent = epsilon_spent(sigma, cfg.dp_delta, sample_rate=q, steps=steps, accountant=cfg.dp_accountant)
    return PrivacyPlan(cfg.dp_epsilon, cfg.dp_delta, cfg.dp_clip, cfg.dp_accountant, cfg.dp_full_batch, n, batch, q,
                       steps_per_epoch, steps, sigma, spent)


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Each of ``n`` examples independently with probability ``rate`` (the batch size varies; it may be 0)."""
    if rate >= 1.0:
        return list(range(n))
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


CLIPPING = ("fast", "per-example")
# Fast clipping's default micro-batch: a 256-row logical batch in two micro-batches holds half the activations and
# records at a time (peak memory 0.87-0.89x the ordinary 256-row step; in one: 1.15-1.18x), and on this CPU
# it is not slower (benchmarks/results/privacy.md).
FAST_MICRO_BATCH = 128


def fit_private(cfg: TrainConfig, plan: PrivacyPlan, tm, train_cache, train_labels, val_cache, val_ds, device,
                progress: bool, result, out_dir, *, chunk: int | None = None, clipping: str | None = None) -> None:
    """Train ``tm``'s Δw with DP-SGD (Poisson batches) or DP-GD (``plan.full_batch``), as planned.

    Each sampled (logical) batch is processed in micro-batches of at most ``chunk`` examples (sorted by length, so
    a micro-batch pads little) whose clipped sums add into one noisy step, so any logical batch, the full data set
    included, runs in bounded memory. ``clipping`` (default ``cfg.dp_clipping``; ``chunk``: ``cfg.dp_micro_batch``):
    ``fast`` — per-example norms and the clipped sum without per-example gradients (:mod:`taft.privacy.ghost`;
    default ``chunk`` = the batch size, at most 128) — or ``per-example`` — the reference, per-example gradients
    materialized (default ``chunk`` 32). Both give the same step (tests/privacy/test_ghost.py). Fills
    ``result.epochs`` and ``result.privacy``; writes ``metrics.jsonl`` when ``out_dir``."""
    from taft.train.fit import TrainingDiverged, end_epoch, lr_lambda, make_optimizer

    if len(train_cache) != plan.n:
        raise ConfigError(f"fit_private: planned for {plan.n} examples, the training features hold {len(train_cache)}")
    clipping = clipping or cfg.dp_clipping
    chunk = chunk or cfg.dp_micro_batch
    if clipping not in CLIPPING:
        raise ConfigError(f"fit_private(clipping={clipping!r}): use one of {CLIPPING}")
    if chunk is None:
        chunk = min(max(cfg.batch_size, 1), FAST_MICRO_BATCH) if clipping == "fast" else 32
    cfg = dataclasses.replace(cfg, epochs=plan.steps // plan.steps_per_epoch)  # min_steps: as planned
    delta = tm.delta_dict()
    g_sample = torch.Generator().manual_seed(cfg.seed)
    g_noise = torch.Generator().manual_seed(cfg.seed + 1)
    # Under torchrun every rank draws the same global Poisson sample and the same noise (same seeds); each clips
    # the examples of the sample it holds, and the clipped sums are added over the ranks before the noise.
    opt = DPOptimizer(make_optimizer(cfg, list(delta.values())), delta, clip=plan.clip,
                      noise_multiplier=plan.noise_multiplier, expected_batch_size=plan.expected_batch_size,
                      generator=g_noise, reduce=sum_over_ranks if isinstance(train_cache, RankShard) else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lr_lambda(cfg, plan.steps_per_epoch))
    loss_fn = make_loss(cfg.loss, kappa=cfg.kappa, m=cfg.rsl_m)
    twin = nonlinear_twin(tm) if tm.linear else None
    lengths = train_cache.lengths
    labels = train_labels.to(device)
    log = (out_dir / "metrics.jsonl").open("w") if out_dir else None
    done = 0
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        for _ in tqdm(range(plan.steps_per_epoch), desc=f"private epoch {epoch + 1}/{cfg.epochs}",
                      disable=not progress, leave=False):
            idx = sorted(held(train_cache, poisson_sample(plan.n, plan.sample_rate, g_sample)),
                         key=lambda i: lengths[i])
            for s in range(0, len(idx), chunk):
                part = idx[s : s + chunk]
                state = train_cache.collate(part, device)
                if clipping == "fast":
                    opt.add_clipped(clipped_sum(tm, state, labels[part], loss_fn, clip=plan.clip, twin=twin)[0])
                else:
                    opt.accumulate(per_example_grads(tm, state, labels[part], loss_fn, chunk=len(part), twin=twin))
            penalty = {n: 2 * cfg.penalty * d.detach() for n, d in delta.items()} if cfg.penalty else None
            opt.step(penalty)
            opt.zero_grad()
            sched.step()
            if cfg.radius is not None:
                project_to_ball(delta, cfg.radius)
            done += 1
        norm = float(squared_norm(delta).detach().sqrt())
        if not math.isfinite(norm):
            raise TrainingDiverged(f"private training diverged: Δw is NaN or infinite after epoch {epoch + 1}; "
                                   f"nothing was written. Lower the learning rate (--lr {cfg.lr:g})")
        row = {"epoch": epoch + 1, "delta_norm": norm, "epoch_s": time.perf_counter() - t,
               "epsilon": epsilon_spent(plan.noise_multiplier, plan.delta, sample_rate=plan.sample_rate, steps=done,
                                        accountant=plan.accountant)}
        end_epoch(row, tm, val_cache, val_ds, cfg, device, result, log, progress)
    if log:
        log.close()
    result.privacy = {**plan.to_dict(), "epsilon": epsilon_spent(
        plan.noise_multiplier, plan.delta, sample_rate=plan.sample_rate, steps=done, accountant=plan.accountant),
        "steps_taken": done}


register_private_training(plan=plan_private_run, fit=fit_private)
