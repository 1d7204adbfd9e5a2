"""Training shard models: everything the shards share is built once (w0, the frozen-prefix features), then one Δw
per shard is trained on that shard's rows — one at a time (``sequential``), all at once with their Δw stacked under
``torch.func.vmap`` (``batched``), or as Ray tasks (``ray``).

Every shard starts from the same w0 and trains with the same configuration; shard ``k``'s batches are drawn with
seed ``cfg.seed + k``, so retraining one shard on its remaining examples is the same computation as training it
from scratch on them (bitwise, in one backend). The batched backend evaluates all active shards in one vmapped
call and steps one optimizer per shard, so it follows the sequential one to rounding (float32: 1e-5).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taft.config import ConfigError, TrainConfig
from taft.engine.dual import Dual
from taft.engine.family import State
from taft.tangent_model import TangentModel
from taft.train.baselines import make_tangent_model
from taft.train.cache import FeatureCache
from taft.train.fit import RunResult, TrainingDiverged, evaluate, fit, lr_lambda, make_optimizer
from taft.train.loop import prepare, resolve_device
from taft.train.losses import make_loss, project_to_ball, squared_norm
from taft.train.text import bucketed_batches

SHARD_METHODS = ("taft", "nlft")
DATA_INDEPENDENT_HEADS = ("zero-shot", "random", "zeros")


def check_shard_config(cfg: TrainConfig) -> None:
    """Refuse settings whose w0 would depend on forgettable examples, or methods the store does not compose."""
    if cfg.method not in SHARD_METHODS:
        raise ConfigError(f"--method {cfg.method}: shard stores train taft (composition) or nlft (Model Soup / "
                          f"SISA baselines); use --method taft or --method nlft")
    if cfg.head_init not in DATA_INDEPENDENT_HEADS:
        raise ConfigError(
            f"--head-init {cfg.head_init}: the shared starting head of a shard store must not depend on training "
            f"examples (a probe fitted on them would survive every forget). Use --head-init zero-shot (the classes' "
            f"descriptions) or --head-init random; the head is trained inside each shard's Δw when the scope "
            f"includes it (last:k does)")
    if cfg.radius is not None and cfg.radius <= 0:
        raise ConfigError(f"--radius {cfg.radius}: must be positive")
    if cfg.dtype != "float32":
        raise ConfigError(f"--dtype {cfg.dtype}: shard stores train in float32 (composition and unlearning are "
                          f"checked there); drop --dtype")


def check_backend(cfg: TrainConfig, backend: str) -> None:
    if cfg.dp_epsilon is not None and backend == "batched":
        raise ConfigError("--backend batched does not train private shards (DP-SGD samples each shard's batches on "
                          "its own); use --backend sequential or ray with --dp-epsilon")


@dataclass
class ShardModel:
    """One trained shard: its Δw (CPU tensors, the model's names) and its validation accuracy."""

    shard: int
    delta: dict[str, Tensor]
    val_acc: float | None
    train_s: float
    privacy: dict | None = None  # a private shard's record (ε spent, δ, σ, C, q, steps): taft.privacy


class ShardTrainer:
    """w0, the training features (``FeatureCache`` with example ids) and the validation split, shared by every shard.

    ``train_features`` (optional): features of the training examples from the store; by default they are
    computed from ``cfg``'s data. ``labels``: ``{id: label}`` for those rows (default: from the data)."""

    def __init__(self, cfg: TrainConfig, clf: nn.Module, features: FeatureCache, labels: dict[str, int], *,
                 val_features: FeatureCache | None = None, val_labels: Tensor | None = None) -> None:
        check_shard_config(cfg)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.clf = clf.to(self.device)
        self.features = features
        self.labels = labels
        self.val_features = val_features
        self.val_labels = val_labels
        self.template = self.new_model()

    @classmethod
    def from_config(cls, cfg: TrainConfig, *, progress: bool = False, features: FeatureCache | None = None,
                    labels: dict[str, int] | None = None, val_features: FeatureCache | None = None) -> ShardTrainer:
        """Build w0 and the validation features from ``cfg``; the training features too unless given (a store's
        ``features`` and ``labels``, which hold no forgotten example). ``val_features``: the validation features a
        store kept, used only if they hold exactly the validation examples ``cfg`` selects (else encoded again)."""
        check_shard_config(cfg)
        device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        prep = prepare(cfg, device)
        template = make_tangent_model(cfg, prep.clf).to(device).eval()
        splits = prep.splits
        if features is None:
            train_ds = splits.train.subset(range(min(len(splits.train), cfg.max_train or len(splits.train))))
            features = prep.cache_for(template, train_ds, "train", progress, None, "")
            labels = dict(zip(train_ds.ids, train_ds.labels.tolist(), strict=True))
        val_labels = None
        if splits.val is not None and len(splits.val):
            val_ds = splits.val.subset(range(min(len(splits.val), cfg.max_eval or len(splits.val))))
            if val_features is None or val_features.ids != list(val_ds.ids):
                val_features = prep.cache_for(template, val_ds, "val", progress, None, "")
            val_labels = val_ds.labels
        else:
            val_features = None
        trainer = cls(cfg, prep.clf, features, labels, val_features=val_features, val_labels=val_labels)
        trainer.prep = prep
        return trainer

    # -- one shard ------------------------------------------------------------------------------------------
    def shard_config(self, shard: int) -> TrainConfig:
        """Shard ``shard``'s batches are drawn with seed ``cfg.seed + shard`` (w0 is the same for every shard)."""
        return dataclasses.replace(self.cfg, seed=self.cfg.seed + shard)

    def new_model(self) -> TangentModel:
        """A fresh tangent model at w0 (Δw = 0) sharing the classifier."""
        return make_tangent_model(self.cfg, self.clf).to(self.device).eval()

    def _data(self, ids: Sequence[str]) -> tuple[FeatureCache, Tensor]:
        if not ids:
            raise ConfigError("a shard has no examples to train on")
        return self.features.subset(list(ids)), torch.tensor([self.labels[i] for i in ids])

    # The batched backend: a shard's batch is cut into pieces of this many rows of similar length, and pieces are
    # grouped by length into vmapped calls, each call costing its padded tokens plus ``call_overhead_tokens``.
    rows_per_piece = 16
    call_overhead_tokens = 256
    validate_shards = True  # validation accuracy of every shard model (for `taft shards status`); off: None

    def validate(self, tm: TangentModel) -> float | None:
        if self.val_features is None:
            return None
        return evaluate(tm, self.val_features, self.val_labels, self.cfg.eval_batch_size, self.device)

    def train_one(self, shard: int, ids: Sequence[str]) -> ShardModel:
        """Train shard ``shard`` on examples ``ids`` (in dataset order) from w0."""
        t0 = time.perf_counter()
        tm = self.new_model()
        cache, labels = self._data(ids)
        scratch = RunResult(config={}, val_acc=float("nan"), test_acc=None)
        scfg = self.shard_config(shard)
        if scfg.dp_epsilon is not None:  # DP-SGD on this shard's examples only (disjoint shards: parallel composition)
            from taft.privacy.fit import fit_private, plan_private_run

            fit_private(scfg, plan_private_run(scfg, len(ids)), tm, cache, labels, None, None, self.device, False,
                        scratch, None)
        else:
            fit(scfg, tm, cache, labels, None, None, self.device, False, scratch, None, what=f"shard {shard}")
        val = self.validate(tm) if self.validate_shards else None
        return ShardModel(shard, _cpu(tm.delta_dict()), val, time.perf_counter() - t0, scratch.privacy)

    def load(self, delta: dict[str, Tensor]) -> TangentModel:
        tm = self.new_model()
        tm.load_delta({n: t.to(self.device) for n, t in delta.items()})
        return tm

    @torch.no_grad()
    def logits(self, deltas: Sequence[dict[str, Tensor]], cache: FeatureCache) -> Tensor:
        """(M, N, C) logits, on the CPU, of the models w0 + Δw (one per ``deltas``) on the rows of ``cache`` — what
        the composed model's accuracy, the shards' ensemble and SISA's vote are computed from."""
        bs, out = self.cfg.eval_batch_size, []
        for d in deltas:
            tm = self.load(d)
            out.append(torch.cat([tm.suffix(cache.collate(list(range(s, min(s + bs, len(cache)))), self.device)).cpu()
                                  for s in range(0, len(cache), bs)]))
        return torch.stack(out)

    # -- many shards at once --------------------------------------------------------------------------------
    def train_batched(self, jobs: Sequence[tuple[int, Sequence[str]]], chunk: int | None = None) -> list[ShardModel]:
        """Train every ``(shard, ids)`` job at once: one vmapped forward/backward per step over the shards that
        still have a batch, one optimizer (and schedule) per shard. ``chunk``: at most this many shards at a time."""
        out: list[ShardModel] = []
        chunk = chunk or len(jobs)
        for s in range(0, len(jobs), chunk):
            out += self._train_together(jobs[s : s + chunk])
        return out

    def _train_together(self, jobs: Sequence[tuple[int, Sequence[str]]]) -> list[ShardModel]:
        t0 = time.perf_counter()
        cfg = self.cfg
        tm = self.new_model()
        names = list(tm.linearized)
        keys = [f"delta.{n.replace('.', ':')}" for n in names]
        K = len(jobs)
        deltas = [{n: nn.Parameter(torch.zeros_like(t)) for n, t in tm.delta_dict().items()} for _ in range(K)]
        data = [self._data(ids) for _, ids in jobs]
        opts, scheds, plans, n_epochs = [], [], [], []
        for (shard, _), (cache, _), delta in zip(jobs, data, deltas, strict=True):
            scfg = self.shard_config(shard)
            scfg = dataclasses.replace(scfg, epochs=scfg.epochs_for(len(cache)))  # as fit() does (min_steps)
            opt = make_optimizer(scfg, list(delta.values()))
            steps = math.ceil(len(cache) / cfg.batch_size)
            opts.append(opt)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(scfg, steps)))
            plans.append((torch.Generator().manual_seed(scfg.seed), cache.lengths))
            n_epochs.append(scfg.epochs)
        loss_fn = make_loss(cfg.loss, kappa=cfg.kappa, m=cfg.rsl_m)
        template = data[0][0].collate([0], self.device)
        aux_keys = [k for k, v in template.aux.items() if isinstance(v, Tensor)]
        static = {k: v for k, v in template.aux.items() if not isinstance(v, Tensor)}

        def shard_forward(params: dict[str, Tensor], h: Tensor, *aux: Tensor) -> Tensor:
            state = State(Dual(h, None), {**static, **dict(zip(aux_keys, aux, strict=True))})
            return torch.func.functional_call(tm, params, (state,))

        lengths_of = [cache.lengths for cache, _ in data]
        tm.forward = tm.suffix  # functional_call calls forward: here the suffix on cached features (a local model)
        vmapped = torch.func.vmap(shard_forward)
        for epoch in range(max(n_epochs)):  # a shard whose epochs are done has no batch (min_steps: they differ)
            epochs = [list(bucketed_batches(lengths, cfg.batch_size, g)) if epoch < n else []
                      for (g, lengths), n in zip(plans, n_epochs, strict=True)]
            for step in range(max(len(e) for e in epochs)):
                active = [k for k in range(K) if step < len(epochs[k])]
                # Each shard's batch is cut into pieces of rows of similar length, and pieces of similar length
                # (from any shard) are padded together and run by one vmapped call, each with its own shard's Δw:
                # the rows of a model are independent, so this is the shard's batch with far less padding.
                pieces = [(k, part) for k in active for part in _row_pieces(epochs[k][step], lengths_of[k],
                                                                            self.rows_per_piece)]
                states = [data[k][0].collate([epochs[k][step][r] for r in part], self.device) for k, part in pieces]
                rows_out: dict[int, list[Tensor | None]] = {k: [None] * len(epochs[k][step]) for k in active}
                for group in length_groups({i: _tokens(st) for i, st in enumerate(states)},
                                           self.call_overhead_tokens):
                    h, aux = _stack_states([states[i] for i in group], aux_keys)
                    stacked = {key: torch.stack([deltas[pieces[i][0]][n] for i in group])
                               for key, n in zip(keys, names, strict=True)}
                    logits = vmapped(stacked, h, *aux)
                    for j, i in enumerate(group):
                        k, part = pieces[i]
                        for r, row in enumerate(part):
                            rows_out[k][row] = logits[j, r]
                total = 0.0
                for k in active:
                    y = data[k][1][epochs[k][step]].to(self.device)
                    loss = loss_fn(torch.stack(rows_out[k]), y)
                    if not math.isfinite(float(loss.detach())):
                        raise TrainingDiverged(
                            f"shard {jobs[k][0]} diverged: the loss is {float(loss)} at epoch {epoch + 1}, step "
                            f"{step + 1}; nothing was written. Lower the learning rate (now --lr {cfg.lr:g})")
                    total = total + (loss + cfg.penalty * squared_norm(deltas[k]) if cfg.penalty else loss)
                for k in active:
                    opts[k].zero_grad(set_to_none=True)
                total.backward()
                for k in active:
                    opts[k].step()
                    scheds[k].step()
                    if cfg.radius is not None:
                        project_to_ball(deltas[k], cfg.radius)
        elapsed = (time.perf_counter() - t0) / K
        out = []
        for (shard, _), delta in zip(jobs, deltas, strict=True):
            d = _cpu(delta)
            if not all(bool(torch.isfinite(t).all()) for t in d.values()):
                raise TrainingDiverged(f"shard {shard} diverged: Δw is NaN or infinite; lower the learning rate "
                                       f"(--lr {cfg.lr:g})")
            out.append(ShardModel(shard, d, self.validate(self.load(d)) if self.validate_shards else None, elapsed))
        return out


def vote_counts(per_shard: Tensor) -> Tensor:
    """SISA's majority vote of (K, N, C) shard logits, as (N, C) vote counts (ties: the lower class, as argmax)."""
    return nn.functional.one_hot(per_shard.argmax(-1), per_shard.shape[-1]).sum(0).float()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows of (N, C) ``logits`` whose argmax is the label."""
    return float((logits.argmax(-1) == labels).float().mean())


def _cpu(delta: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().to("cpu").clone() for n, t in delta.items()}


def _pad_to(t: Tensor, rows: int, tokens: int | None) -> Tensor:
    """``t`` (B, T, ...) padded to ``rows`` rows (copies of row 0, never read by the loss) and ``tokens`` tokens
    (zeros: masked out, as the cache's own padding is)."""
    if tokens is not None and t.dim() >= 2 and t.shape[1] < tokens:
        t = torch.cat([t, t.new_zeros((t.shape[0], tokens - t.shape[1], *t.shape[2:]))], 1)
    if t.shape[0] < rows:
        t = torch.cat([t, t[:1].expand(rows - t.shape[0], *t.shape[1:])], 0)
    return t


def _tokens(state: State) -> tuple[int, int]:
    """(rows, tokens per row) of a collated batch (tokens 1 for inputs without a padding mask)."""
    mask = state.aux.get("attention_mask")
    return state.h.primal.shape[0], (state.h.primal.shape[1] if isinstance(mask, Tensor) else 1)


def _row_pieces(batch: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """Positions in ``batch`` sorted by their example's length, cut into pieces of at most ``size``."""
    order = sorted(range(len(batch)), key=lambda r: (lengths[batch[r]], r))
    return [order[s : s + size] for s in range(0, len(order), size)]


def length_groups(sizes: dict[int, tuple[int, int]], overhead_tokens: int = 256) -> list[list[int]]:
    """Split batches (pieces of shard batches) into groups run by one vmapped call each, so that padding every batch
    of a group to its longest costs little: the partition of the batches sorted by length that minimizes padded
    tokens plus ``overhead_tokens`` per call (a call's fixed cost, in tokens). ``sizes``: batch -> (rows, tokens
    per row)."""
    order = sorted(sizes, key=lambda k: (sizes[k][1], k))
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[i]: cost of the first i batches
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        rows = 0
        for j in range(i, 0, -1):  # group order[j-1 : i], padded to order[i-1]'s length
            rows = max(rows, sizes[order[j - 1]][0])
            cost = best[j - 1] + (i - j + 1) * rows * sizes[order[i - 1]][1] + overhead_tokens
            if cost < best[i]:
                best[i], cut[i] = cost, j - 1
    groups, i = [], n
    while i:
        groups.append(order[cut[i] : i])
        i = cut[i]
    return groups[::-1]


def _stack_states(states: list[State], aux_keys: list[str]) -> tuple[Tensor, list[Tensor]]:
    """Batches of several shards (or pieces of them) as one (K, B, T, ...) input: rows and tokens padded to the
    largest batch (padding rows are never read: each piece's logits are taken by its own row positions)."""
    B = max(s.h.primal.shape[0] for s in states)
    padded = "attention_mask" in states[0].aux and isinstance(states[0].aux["attention_mask"], Tensor)
    T = max(s.h.primal.shape[1] for s in states) if padded else None
    h = torch.stack([_pad_to(s.h.primal, B, T) for s in states])
    aux = [torch.stack([_pad_to(s.aux[k], B, T) for s in states]) for k in aux_keys]
    return h, aux
