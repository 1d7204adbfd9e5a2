"""The multi-task setting: one shared encoder, each task its own frozen zero-shot head.

The encoder is a :class:`~taft.models.classifier.Classifier` whose head is the identity: its output is the
L2-normalized mean-pooled sentence embedding ``z`` (in tangent modes its linearization ``z0 + J·Δw``). Task ``t``'s
logits are ``z @ H_tᵀ`` with ``H_t`` the zero-shot head built from the task's class descriptions — the head
``taft train --head-init zero-shot`` builds, so a task vector touches encoder parameters only and every task reads
the same ``z``. (Linearizing the classifier equals linearizing ``z`` and applying the fixed linear head.)

Tangent-space outputs are linear in Δw, so ``f0 + J·Σαᵢτᵢ = f0 + Σαᵢ(J·τᵢ)``: :meth:`MultiTaskSuite.outputs`
computes ``J·τᵢ`` once per vector and split and combines them for every α (exact up to float rounding; tested),
which makes α grids and disentanglement grids of ``ntk`` / ``taft-last1`` vectors cheap. Weight-space modes run
the encoder once per coefficient setting.

Data is read lazily per (task, split): a search on validation never touches a test split.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from taft import delta as D
from taft.arithmetic.modes import Mode, get_mode
from taft.arithmetic.vectors import TaskVector, TaskVectorError, combine
from taft.checkpoint import fingerprints
from taft.config import ConfigError, coerce_fields, from_dict
from taft.data.examples import DatasetSplits
from taft.models.classifier import Classifier
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache
from taft.train.loop import ZERO_SHOT_SCALE, TrainingDiverged, encode_texts
from taft.train.text import bucketed_batches, prefix_batches, tokenize

SPLITS = ("train", "val", "test")


@dataclass
class ArithmeticConfig:
    model: str = field(default="minilm", metadata={"help": "text encoder (minilm | tiny-bert | hf:NAME)"})
    tasks: str = field(default="mr,sst2,sst5,subj,trec", metadata={"help": "comma-separated sentence tasks"})
    data_root: str | None = field(default=None, metadata={"help": "folder of the sentence-task files"})
    max_length: int = field(default=64, metadata={"help": "tokens per sentence"})
    max_train: int | None = field(default=None, metadata={"help": "training sentences per task (seeded sample)"})
    max_eval: int | None = field(default=None, metadata={"help": "val sentences per task (seeded sample)"})
    max_test: int | None = field(default=None, metadata={"help": "test sentences per task (default: max_eval)"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=128, metadata={"help": "evaluation batch size"})
    seed: int = field(default=0, metadata={"help": "seed of the validation split, samples and shuffling"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})

    def __post_init__(self) -> None:
        coerce_fields(self)
        for name in ("max_length", "batch_size", "eval_batch_size", "max_train", "max_eval", "max_test", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                sample = name in ("max_train", "max_eval", "max_test")
                hint = "; leave it unset to use every sentence" if sample else ""
                raise ConfigError(f"{name} must be an integer ≥ 1, got {value}{hint}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in 0..2**63-1, got {self.seed}")
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise ConfigError("tasks is empty; name one or more sentence tasks, e.g. sst2,mr")


# The settings that decide which sentences a suite evaluates on: the files, the seeded validation carve and samples,
# the tokenization and the sample sizes. (max_train is not one: no evaluation reads the train split, and the
# validation carve does not depend on it.) The CLI flag of each, for the messages.
DATA_SETTINGS = {"data_root": "--data-root", "seed": "--seed", "max_length": "--max-length",
                 "max_eval": "--max-eval", "max_test": "--max-test"}


def vector_config(tv: TaskVector, name: str = "") -> ArithmeticConfig | None:
    """The :class:`ArithmeticConfig` a task vector was trained under (``info["config"]``, written by
    ``taft arithmetic finetune``); None for a vector that records none (built in memory)."""
    if "config" not in tv.info:
        return None
    try:
        return from_dict(ArithmeticConfig, json.loads(tv.info["config"]))
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError; so is a JSON error
        raise TaskVectorError(f"task vector {name or tv.task or 'unnamed'} records a training config that cannot be "
                              f"read ({e}); fine-tune it again with `taft arithmetic finetune`") from e


def data_settings(cfg: ArithmeticConfig) -> dict[str, object]:
    """The values of :data:`DATA_SETTINGS` as a suite uses them (``max_test`` defaults to ``max_eval``)."""
    root = None if cfg.data_root is None else str(Path(cfg.data_root).expanduser().resolve())
    return {"data_root": root, "seed": cfg.seed, "max_length": cfg.max_length, "max_eval": cfg.max_eval,
            "max_test": cfg.max_eval if cfg.max_test is None else cfg.max_test}


def check_same_data(vectors: Sequence[TaskVector], names: Sequence[str] | None = None) -> None:
    """Refuse task vectors trained under different :data:`DATA_SETTINGS`: a suite is built from one vector's
    settings, and with another seed (or files) its validation split can hold another vector's training sentences;
    with another length or sample size it is not the evaluation that vector was tuned on. Vectors recording no
    config are not compared. ``allow_mixed`` (bases, modes) never waives this."""
    names = [f"#{i} ({v.task or 'unnamed'})" for i, v in enumerate(vectors)] if names is None else list(names)
    seen: list[tuple[str, dict]] = []
    for v, name in zip(vectors, names, strict=True):
        cfg = vector_config(v, name)
        if cfg is not None:
            seen.append((name, data_settings(cfg)))
    for name, settings in seen[1:]:
        first_name, first = seen[0]
        for key, flag in DATA_SETTINGS.items():
            if settings[key] != first[key]:
                raise TaskVectorError(
                    f"task vectors trained on different data: {key} {first[key]} for {first_name} but "
                    f"{settings[key]} for {name}; the evaluation suite is built from one setting, so validation "
                    f"could overlap another vector's training data or differ from what it was tuned on. Fine-tune "
                    f"them with the same {flag} (--allow-mixed does not waive this)")


@dataclass
class FinetuneResult:
    vector: TaskVector
    train_s: float
    steps: int
    final_loss: float
    checkpoints: dict[float, TaskVector] = field(default_factory=dict)  # epoch -> τ at that early-stopping point


class MultiTaskSuite:
    """Shared encoder + frozen per-task heads + lazily built feature caches; fine-tunes and evaluates task vectors.

    Args:
        backbone: the text encoder (a family :class:`TangentModel` knows).
        tokenizer: its tokenizer.
        splits: ``{task: DatasetSplits}``; ``descriptions``: ``{task: one phrase per class}`` (the zero-shot heads).
    """

    def __init__(self, backbone: nn.Module, tokenizer: Any, splits: dict[str, DatasetSplits],
                 descriptions: dict[str, Sequence[str]], *, max_length: int = 64, max_train: int | None = None,
                 max_eval: int | None = None, max_test: int | None = None, batch_size: int = 32,
                 eval_batch_size: int = 128, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.tokenizer = tokenizer
        self.splits = splits
        self.tasks = list(splits)
        self.max_length, self.max_train, self.max_eval = max_length, max_train, max_eval
        self.max_test = max_eval if max_test is None else max_test
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        backbone = backbone.to(self.device).eval()
        dtype = next(backbone.parameters()).dtype
        self.encoder = Classifier(backbone, 1, pooling="mean", normalize=True)
        dim = self.encoder.head.in_features
        # identity head: the output is the embedding z
        self.encoder.head = nn.Linear(dim, dim).to(device=self.device, dtype=dtype)
        self.encoder.set_head(torch.eye(dim), 0.0)
        self.heads = {t: (ZERO_SHOT_SCALE * encode_texts(backbone, tokenizer, list(descriptions[t]),
                                                         max_length=max_length)).to(dtype) for t in self.tasks}
        self._tms: dict[str, TangentModel] = {}
        self._data: dict[tuple, tuple[FeatureCache, Tensor]] = {}
        self._memo: dict[tuple, Tensor] = {}
        self._fingerprint: str | None = None

    @classmethod
    def from_config(cls, cfg: ArithmeticConfig, tasks: Sequence[str] | None = None) -> MultiTaskSuite:
        from taft.data.text import SENTENCE_TASKS, load_text_dataset
        from taft.zoo import load_model, load_tokenizer

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        names = list(tasks) if tasks is not None else [t.strip() for t in cfg.tasks.split(",") if t.strip()]
        splits = {t: load_text_dataset(t, root=cfg.data_root, seed=cfg.seed) for t in names}
        desc = {t: SENTENCE_TASKS[t].descriptions for t in names}
        return cls(load_model(cfg.model), load_tokenizer(cfg.model), splits, desc, max_length=cfg.max_length,
                   max_train=cfg.max_train, max_eval=cfg.max_eval, max_test=cfg.max_test, batch_size=cfg.batch_size,
                   eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=cfg.device)

    # -- models ---------------------------------------------------------------------------------------
    def tangent_model(self, mode: str | Mode) -> TangentModel:
        m = get_mode(mode) if isinstance(mode, str) else mode
        if m.name not in self._tms:
            self._tms[m.name] = TangentModel(self.encoder, m.scope, linear=m.linear, seed=self.seed).to(
                self.device).eval()
        return self._tms[m.name]

    def release(self, mode: str) -> None:
        """Drop a mode's wrapper (its copies of w0 and Δw) and its memoized outputs."""
        self._tms.pop(mode, None)
        self._memo = {k: v for k, v in self._memo.items() if k[0] != mode}

    def base_fingerprint(self) -> str:
        """The encoder's fingerprint (every mode shares it: the head is the identity and not in any scope)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprints(self.tangent_model("linear-layers"))["backbone"]
        return self._fingerprint

    def check_vectors(self, vectors: Sequence[TaskVector], who: str) -> None:
        """Refuse a task vector whose recorded training config (``taft arithmetic finetune``) evaluates on other
        data than this suite: another seed (validation carve and samples), token length or sample size."""
        mine = {"seed": self.seed, "max_length": self.max_length, "max_eval": self.max_eval,
                "max_test": self.max_test}
        for v in vectors:
            cfg = vector_config(v)
            if cfg is None:
                continue
            theirs = data_settings(cfg)
            for key, value in mine.items():
                if theirs[key] != value:
                    raise TaskVectorError(
                        f"{who}: task vector {v.task or 'unnamed'} was fine-tuned with {key} {theirs[key]}, this suite "
                        f"evaluates with {value}: its validation could overlap that vector's training data or differ "
                        f"from what it was tuned on; build the suite with {key}={theirs[key]}")

    # -- data -----------------------------------------------------------------------------------------
    def data(self, task: str, split: str, tm: TangentModel, limit: int | None = None) -> tuple[FeatureCache, Tensor]:
        """Prefix features and labels of a seeded sample of ``split`` (``max_train`` / ``max_eval``, then ``limit``).
        Built on first use only: nothing reads a split that no caller asks for."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        key = (task, split, tm.start, limit)
        if key not in self._data:
            ds = getattr(self.splits[task], split)
            if ds is None:
                raise ValueError(f"task {task!r} has no {split} split")
            cap = {"train": self.max_train, "val": self.max_eval, "test": self.max_test}[split]
            g = torch.Generator().manual_seed(self.seed + SPLITS.index(split))
            order = torch.randperm(len(ds), generator=g).tolist()
            n = min(x for x in (len(ds), cap, limit) if x is not None)
            ds = ds.subset(sorted(order[:n]))
            ids = tokenize(self.tokenizer, ds.texts, self.max_length)
            cache = FeatureCache.build(tm, prefix_batches(ids, self.eval_batch_size, self.tokenizer.pad_token_id or 0,
                                                          self.device), len(ids), progress=False, ids=ds.ids)
            self._data[key] = (cache, ds.labels)
        return self._data[key]

    # -- outputs --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, tm: TangentModel, cache: FeatureCache, parts: bool) -> tuple[Tensor, Tensor | None]:
        order = sorted(range(len(cache)), key=lambda i: cache.lengths[i])
        head = self.encoder.head.weight
        f0 = torch.empty(len(cache), head.shape[0], device=self.device, dtype=head.dtype)
        jv = torch.empty_like(f0) if parts else None
        for s in range(0, len(order), self.eval_batch_size):
            idx = order[s : s + self.eval_batch_size]
            state = cache.collate(idx, self.device)
            if parts:
                a, b = tm.suffix_parts(state)
                f0[idx], jv[idx] = a.to(f0.dtype), b.to(f0.dtype)
            else:
                f0[idx] = tm.suffix(state).to(f0.dtype)
        return f0, jv

    def _load(self, tm: TangentModel, delta: dict[str, Tensor] | None) -> None:
        tm.load_delta(delta if delta is not None else {n: torch.zeros_like(d) for n, d in tm.delta_dict().items()})

    def outputs(self, mode: str, task: str, split: str, vectors: Sequence[TaskVector] = (),
                coefs: Sequence[float] = (), *, limit: int | None = None, allow_mixed: bool = False) -> Tensor:
        """Embeddings ``z`` (N, D) of ``task``'s ``split`` under ``Σ coefsᵢ·vectorsᵢ`` applied in ``mode``'s space."""
        m = get_mode(mode)
        tm = self.tangent_model(m)
        cache, _ = self.data(task, split, tm, limit)
        live = [(v, float(c)) for v, c in zip(vectors, coefs, strict=True) if c != 0.0]
        if not allow_mixed:
            for v in vectors:
                if v.mode != m.name:
                    raise TaskVectorError(f"a {v.mode!r} task vector ({v.task or 'unnamed'}) cannot be applied as a "
                                          f"{m.name!r} one (another space or parameter set); pass allow_mixed=True")
                if v.base_fingerprint != self.base_fingerprint():
                    raise TaskVectorError(
                        f"task vector {v.task or 'unnamed'} was trained from another base encoder (fingerprint "
                        f"{v.base_fingerprint[:12]} vs {self.base_fingerprint()[:12]}); pass allow_mixed=True to force")
        if not m.linear:
            if not live:
                return self._memoized((m.name, task, split, limit, "f0"), lambda: self._run(tm, cache, False)[0])
            self._load(tm, combine([v for v, _ in live], [c for _, c in live], allow_mixed=allow_mixed))
            try:
                return self._run(tm, cache, False)[0]
            finally:
                self._load(tm, None)
        z = self._memoized((m.name, task, split, limit, "f0"), lambda: self._run(tm, cache, False)[0]).clone()
        for v, c in live:
            z += c * self._memoized((m.name, task, split, limit, v.uid), lambda v=v: self._jvp(tm, cache, v))
        return z

    def _jvp(self, tm: TangentModel, cache: FeatureCache, v: TaskVector) -> Tensor:
        self._load(tm, v.tensors)
        try:
            return self._run(tm, cache, True)[1]
        finally:
            self._load(tm, None)

    def _memoized(self, key: tuple, compute) -> Tensor:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def logits(self, z: Tensor, task: str) -> Tensor:
        return z @ self.heads[task].T  # (N, C)

    def labels(self, mode: str, task: str, split: str, limit: int | None = None) -> Tensor:
        return self.data(task, split, self.tangent_model(mode), limit)[1]

    def accuracy(self, mode: str, task: str, split: str, vectors: Sequence[TaskVector] = (),
                 coefs: Sequence[float] = (), **kw) -> float:
        z = self.outputs(mode, task, split, vectors, coefs, **kw)
        y = self.labels(mode, task, split, kw.get("limit"))
        return int((self.logits(z, task).argmax(-1).cpu() == y).sum()) / max(len(y), 1)

    # -- fine-tuning ----------------------------------------------------------------------------------
    def finetune(self, task: str, mode: str, *, lr: float, epochs: int = 1, weight_decay: float = 0.0,
                 warmup: float = 0.1, seed: int | None = None, checkpoints: Sequence[float] = (),
                 stop: float | None = None) -> FinetuneResult:
        """Cross-entropy fine-tuning of ``mode``'s parameters through ``task``'s frozen head (AdamW, linear warm-up
        then cosine decay over ``epochs``); returns τ = Δw. The wrapper's Δw is reset to 0 afterwards.

        ``checkpoints``: epochs (fractions allowed) at which τ is also kept, in ``FinetuneResult.checkpoints`` —
        early-stopping points of this one schedule, for choosing a training length on validation. ``stop``: end the
        run after this many epochs (the schedule still spans ``epochs``), so a chosen early-stopping point can be
        rerun (another seed) without training past it."""
        m = get_mode(mode)
        tm = self.tangent_model(m)
        cache, labels = self.data(task, "train", tm)
        head = self.heads[task]
        seed = self.seed if seed is None else seed
        g = torch.Generator().manual_seed(seed)
        delta = tm.delta_dict()
        opt = torch.optim.AdamW(list(delta.values()), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(cache) / self.batch_size)
        total = max(epochs * steps_per_epoch, 1)
        warm = int(warmup * total)

        def factor(s: int) -> float:
            return (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        end = total if stop is None else self._epoch_step(stop, epochs, steps_per_epoch)
        at: dict[int, float] = {}
        for c in sorted(float(c) for c in checkpoints):
            at_step = self._epoch_step(c, epochs, steps_per_epoch)
            if at_step in at:
                raise ConfigError(f"lengths {at[at_step]:g} and {c:g} epochs end at the same step ({at_step}, with "
                                  f"{steps_per_epoch} steps per epoch); drop one or use more training examples")
            if at_step > end:
                raise ConfigError(f"checkpoint at epoch {c:g} is after the run stops (epoch {stop:g})")
            at[at_step] = c
        base_info = {"lr": lr, "epochs": epochs, "train_examples": len(cache), "seed": seed, "scope": m.scope}
        kept: dict[float, TaskVector] = {}

        def snapshot(epoch: float) -> TaskVector:
            info = {**base_info, "stopped_at_epoch": epoch}
            return TaskVector({n: d.detach().clone() for n, d in delta.items()}, m.name, self.base_fingerprint(),
                              task, {k: str(v) for k, v in info.items()})

        t0, step, loss_v = time.perf_counter(), 0, float("nan")
        self._load(tm, None)
        # each epoch's batches are drawn when it starts, so stopping early draws no later epoch's order
        batches = (idx for _ in range(epochs) for idx in bucketed_batches(cache.lengths, self.batch_size, g))
        with torch.enable_grad():
            for idx in itertools.islice(batches, end):
                z = tm.suffix(cache.collate(idx, self.device))  # (B, D)
                loss = nn.functional.cross_entropy(z @ head.T, labels[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                loss_v = float(loss.detach())
                if not math.isfinite(loss_v):
                    self._load(tm, None)
                    raise TrainingDiverged(f"fine-tuning {mode} on {task} diverged at step {step} (lr {lr:g})")
                if step in at:
                    kept[at[step]] = snapshot(at[step])
        train_s = time.perf_counter() - t0
        tv = snapshot(float(epochs if stop is None else stop))
        self._load(tm, None)
        return FinetuneResult(tv, train_s, step, loss_v, kept)

    @staticmethod
    def _epoch_step(epoch: float, epochs: int, steps_per_epoch: int) -> int:
        """The optimizer step at which ``epoch`` (a fraction of the run's epochs) ends; refuses points outside it."""
        if not (math.isfinite(epoch) and 0 < epoch <= epochs) or round(epoch * steps_per_epoch) < 1:
            raise ConfigError(f"checkpoint/stop at epoch {epoch:g} is outside the run ({epochs} epoch(s) of "
                              f"{steps_per_epoch} steps); use a value in (0, {epochs}] of at least one step")
        return round(epoch * steps_per_epoch)


def zero_vector(tv: TaskVector) -> TaskVector:
    """A vector of ``tv``'s names, mode and base, all zeros."""
    return TaskVector(D.scale(tv.tensors, 0.0), tv.mode, tv.base_fingerprint, tv.task, dict(tv.info))
