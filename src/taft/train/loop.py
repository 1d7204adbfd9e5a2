"""Fine-tuning runs: TAFT and its baselines through one loop on cached frozen-prefix features.

``train(cfg)`` builds the classifier (backbone + pooling + head), wraps it in a :class:`TangentModel`
(``linear=True`` for TAFT, ``False`` for NLFT / FC / LoRA / adapters), caches the frozen prefix once per split,
trains Δw and writes ``delta.safetensors``, ``config.yaml``, ``metrics.jsonl``, ``results.json`` and last the
``run.json`` manifest — into a staging folder that replaces ``output_dir`` only when complete
(:mod:`taft.train.rundir`). A non-finite loss stops the run with a :class:`TrainingDiverged` error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from taft.checkpoint import save_delta
from taft.config import ConfigError, TrainConfig, save_config
from taft.data.examples import check_label_space
from taft.data.text import SENTENCE_TASKS, load_text_dataset
from taft.errors import TaftError
from taft.models.classifier import Classifier, pool
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache, cache_info, cache_key, load_cached
from taft.train.losses import make_loss, project_to_ball, squared_norm
from taft.train.pipeline import Prepared
from taft.train.rundir import RunFolder, ensure_writable_folder, finite_json, write_json
from taft.train.text import bucketed_batches, padded_batch, prefix_batches, tokenize
from taft.zoo import load_model, load_tokenizer

ZERO_SHOT_SCALE = 20.0  # logit scale of cosine-similarity heads (sentence-transformers' usual temperature)


class TrainingDiverged(TaftError):
    """The loss or Δw became NaN / infinite; nothing is written."""


def resolve_device(name: str) -> torch.device:
    """``name`` as a device that exists on this machine, or a :class:`ConfigError` saying what does."""
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name!r}: MPS is not available here; use --device cpu")
    return dev


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- model ------------------------------------------------------------------------------------------------
@torch.no_grad()
def text_embeddings(backbone: nn.Module, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings (how MiniLM was trained)."""
    from taft.engine.family import family_for

    dev = next(backbone.parameters()).device
    batch = padded_batch(tokenize(tokenizer, texts, max_length), device=dev)
    h = family_for(backbone).select_output(backbone(**batch))
    return nn.functional.normalize(pool(h, batch["attention_mask"], "mean"), dim=-1)


def build_classifier(cfg: TrainConfig, backbone: nn.Module, tokenizer, num_classes: int,
                     descriptions: list[str] | None) -> Classifier:
    """Backbone + mean pooling + head, initialized per ``cfg.head_init`` (seeded, so rebuilding is exact)."""
    # head_init=probe starts from the zero-shot head where the classes have descriptions, else from random
    zero_shot = (cfg.head_init == "zero-shot" or cfg.method == "zero-shot"
                 or (cfg.head_init == "probe" and bool(descriptions)))
    torch.manual_seed(cfg.seed)
    clf = Classifier(backbone, num_classes, pooling="mean", normalize=zero_shot)
    if zero_shot:
        if not descriptions:
            raise ConfigError("head_init=zero-shot needs class descriptions (a registered task or class names); "
                              "use --head-init random")
        clf.set_head(ZERO_SHOT_SCALE * text_embeddings(backbone, tokenizer, descriptions))
    elif cfg.head_init == "zeros":
        clf.set_head(0.0)
    return clf


def probe_head(cfg: TrainConfig, clf: Classifier, train_feats: FeatureCache, labels: torch.Tensor,
               device) -> None:
    """Linear probe on frozen features (LP-then-FT): the trained head becomes w0 of the head, in place.

    The tangent space of the block is then taken around a head that already separates the classes."""
    fc_cfg = dataclasses.replace(cfg, method="fc", lr=cfg.probe_lr, epochs=cfg.probe_epochs, penalty=0.0,
                                 radius=None, warmup=0.0, schedule="cosine")
    tm = make_tangent_model(fc_cfg, clf).to(device).eval()
    scratch = RunResult(config={}, val_acc=float("nan"), test_acc=None)
    _fit(fc_cfg, tm, train_feats, labels, None, None, device, False, scratch, None,
         what="the linear probe (head_init=probe)", lr_flag="--probe-lr")
    with torch.no_grad():
        for n, d in tm.delta_dict().items():
            clf.get_parameter(n).add_(d)


def _linears_in_last_blocks(tm_probe: TangentModel, k: int) -> list[str]:
    stages = [s for s in tm_probe._stages if s.block][-k:]
    prefixes = [p for s in stages for p in s.prefixes]
    return [n for n, m in tm_probe.base.named_modules()
            if isinstance(m, nn.Linear) and any(n.startswith(p + ".") for p in prefixes)]


def make_tangent_model(cfg: TrainConfig, clf: Classifier) -> TangentModel:
    """The trainable wrapper for ``cfg.method`` (all methods share scopes, caching and checkpoints)."""
    # a model run in bf16/fp16 trains a float32 master copy of Δw (steps below the low precision still count)
    master = None if cfg.dtype == "float32" else torch.float32
    common = dict(reinit=cfg.reinit, linearize_cls=cfg.linearize_cls, seed=cfg.seed, master_dtype=master)
    if cfg.method in ("taft", "nlft"):
        return TangentModel(clf, cfg.scope, linear=cfg.method == "taft", **common)
    if cfg.method in ("fc", "zero-shot"):
        return TangentModel(clf, "head", linear=False, seed=cfg.seed, master_dtype=master)
    # LoRA / (IA)³ adapters via peft, injected into a copy of the classifier's last blocks.
    from peft import IA3Config, LoraConfig, inject_adapter_in_model

    k = int(cfg.scope.split(":")[1]) if cfg.scope.startswith("last:") else 1
    clf = copy.deepcopy(clf)
    targets = _linears_in_last_blocks(TangentModel(clf, "head", linear=False), k)
    if cfg.method == "lora":
        pcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets)
        pattern = r"re:.*lora_[AB]\..*"
    else:  # (IA)³: learned rescaling of keys/values/FFN; down-projections are the feed-forward ones
        ff = [n for n in targets if clf.get_submodule(n).in_features > clf.get_submodule(n).out_features]
        pcfg = IA3Config(target_modules=targets, feedforward_modules=ff)
        pattern = r"re:.*ia3_l\..*"
    torch.manual_seed(cfg.seed)
    inject_adapter_in_model(pcfg, clf)
    return TangentModel(clf, f"head,{pattern}", linear=False, seed=cfg.seed, master_dtype=master)


# -- data -------------------------------------------------------------------------------------------------
def _cache_for(tm, tokenizer, dataset, cfg, name: str, progress: bool, cache_dir: Path | None, key: str):
    info = cache_info(tm, cfg)
    if cache_dir is not None:
        hit = load_cached(cache_dir / f"{key}-{name}.safetensors", dataset, info)
        if hit is not None:
            return hit
    ids = tokenize(tokenizer, dataset.texts, cfg.max_length)
    dev = torch.device(cfg.device)
    cache = FeatureCache.build(tm, prefix_batches(ids, cfg.eval_batch_size, tokenizer.pad_token_id or 0, dev),
                               len(ids), desc=f"prefix features ({name})", progress=progress,
                               ids=dataset.ids, info=info)
    if cache_dir is not None:
        cache.save(cache_dir / f"{key}-{name}.safetensors")
    return cache


def prepare(cfg: TrainConfig, device: torch.device) -> Prepared:
    """Data and classifier for ``cfg``: the one switch between the text and image pipelines (by the data spec).
    The classifier is built in float32 (its zero-shot head too) and then cast to ``cfg.dtype``."""
    from taft.train.images import is_image_spec, prepare_images

    prep = prepare_images(cfg, device) if is_image_spec(cfg.data) else _prepare_text(cfg, device)
    prep.clf.to(getattr(torch, cfg.dtype))
    return prep


def _prepare_text(cfg: TrainConfig, device: torch.device) -> Prepared:
    splits = load_text_dataset(cfg.data, cfg.test_file, root=cfg.data_root, seed=cfg.seed,
                               num_classes=cfg.num_classes)
    task = SENTENCE_TASKS.get(cfg.data)
    descriptions = list(task.descriptions) if task else (list(splits.train.class_names or []) or None)
    tokenizer = load_tokenizer(cfg.model)
    backbone = load_model(cfg.model).to(device)
    clf = build_classifier(cfg, backbone, tokenizer, splits.train.num_classes, descriptions).to(device)
    positions = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    text_cfg = cfg
    if positions and cfg.max_length > positions:  # longer inputs would index past the position embeddings
        if cfg.max_length != TrainConfig.max_length:  # the default is only a cap: no warning for small models
            warnings.warn(f"max_length={cfg.max_length} exceeds the {positions} positions of {cfg.model}; "
                          f"sentences are cut at {positions} tokens", stacklevel=2)
        text_cfg = dataclasses.replace(cfg, max_length=positions)

    def cache_for(tm, ds, name, progress, cache_dir, key):
        return _cache_for(tm, tokenizer, ds, text_cfg, name, progress, cache_dir, key)

    return Prepared(splits, clf, cache_for)


@torch.no_grad()
def evaluate(tm: TangentModel, cache: FeatureCache, labels: torch.Tensor, batch_size: int, device) -> float:
    """Accuracy of ``tm`` on cached features."""
    correct = 0
    lengths = cache.lengths
    order = sorted(range(len(cache)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        logits = tm.suffix(cache.collate(idx, device))
        correct += int((logits.argmax(-1).cpu() == labels[idx]).sum())
    return correct / max(len(cache), 1)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
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


def _optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # the penalty is λ‖Δw‖², explicit
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


# -- the run ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, progress: bool = True, caches: dict | None = None,
          evaluate_test: bool = True) -> RunResult:
    """Run ``cfg`` end to end. ``caches`` (a dict) lets several runs share prefix features in one process.

    ``evaluate_test=False`` never touches the test split (no features, no accuracy): hyperparameter search
    runs its candidates this way and scores only the selected one on test.

    With ``cfg.output_dir`` the folder is checked first (before features are computed) and written only when the
    run is complete: any error, a diverged loss included, leaves it as it was."""
    device = resolve_device(cfg.device)
    if cfg.cache == "disk":
        cache_dir = Path(cfg.cache_dir).expanduser()
        ensure_writable_folder(cache_dir, f"--cache-dir {cache_dir}", ConfigError)
    if not cfg.output_dir:
        return _run(cfg, device, progress, caches, None, None, evaluate_test)
    with RunFolder(cfg.output_dir, overwrite=cfg.overwrite) as folder:
        result = _run(cfg, device, progress, caches, folder.path, folder.run_id, evaluate_test)
        result.output_dir = str(folder.target)
        write_json(folder.path / "results.json", result.to_dict())
        folder.commit(num_classes=result.num_classes, method=cfg.method, model=cfg.model, data=cfg.data)
    return result


def _run(cfg: TrainConfig, device: torch.device, progress: bool, caches: dict | None, out_dir: Path | None,
         run_id: str | None, evaluate_test: bool = True) -> RunResult:
    t_start = time.perf_counter()
    caches = {} if caches is None else caches
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prep = prepare(cfg, device)  # text or images
    splits, clf = prep.splits, prep.clf
    check_label_space(splits if evaluate_test else dataclasses.replace(splits, test=None))
    train_ds = splits.train.subset(range(min(len(splits.train), cfg.max_train or len(splits.train))))
    evals = {"val": splits.val, "test": splits.test if evaluate_test else None}
    evals = {k: (v.subset(range(min(len(v), cfg.max_eval or len(v)))) if v is not None else None)
             for k, v in evals.items()}
    plan = None
    if cfg.dp_epsilon is not None:  # private run: planned (σ calibrated, bad targets refused) before any features
        from taft.privacy.fit import plan_private_run

        plan = plan_private_run(cfg, len(train_ds))
    if cfg.head_init == "probe" and cfg.method not in ("fc", "zero-shot"):
        t_probe = time.perf_counter()
        probe_tm = make_tangent_model(dataclasses.replace(cfg, method="fc"), clf).to(device).eval()
        # same key as an FC run's training features: the probe *is* that run (shared across runs of a task)
        ck = (cache_key(probe_tm, cfg, train_ds, prep.data_fingerprint), "train")
        if ck not in caches:
            caches[ck] = prep.cache_for(probe_tm, train_ds, "probe", progress, None, "")
        probe_head(cfg, clf, caches[ck], train_ds.labels, device)
        probe_s = time.perf_counter() - t_probe
    else:
        probe_s = 0.0
    tm = make_tangent_model(cfg, clf).to(device).eval()  # eval: no dropout, f_lin is deterministic

    t0 = time.perf_counter()
    cache_dir = Path(cfg.cache_dir) if cfg.cache == "disk" else None
    feats = {}
    for name, ds in (("train", train_ds), *evals.items()):
        if ds is None:
            continue
        key = cache_key(tm, cfg, ds, prep.data_fingerprint)
        ck = (key, name)
        if ck not in caches:
            caches[ck] = prep.cache_for(tm, ds, name, progress, cache_dir, key)
        feats[name] = caches[ck]
    cache_s = time.perf_counter() - t0 + probe_s
    if cfg.cache == "none":
        caches.clear()

    result = RunResult(config=dataclasses.asdict(cfg), val_acc=float("nan"), test_acc=None,
                       device=str(device), cache_s=cache_s, num_classes=int(clf.head.out_features),
                       trainable_params=sum(d.numel() for d in tm.delta_dict().values()))
    if out_dir:
        save_config(cfg, out_dir / "config.yaml")
        if cfg.head_init == "probe":  # part of w0 that cannot be rebuilt from the config alone
            save_file({n: p.detach().cpu().contiguous() for n, p in clf.head.named_parameters()},
                      str(out_dir / "base_head.safetensors"))

    t1 = time.perf_counter()
    if plan is not None:
        from taft.privacy.fit import fit_private

        fit_private(cfg, plan, tm, feats["train"], train_ds.labels, feats.get("val"), evals["val"], device, progress,
                    result, out_dir)
    elif cfg.method != "zero-shot":
        _fit(cfg, tm, feats["train"], train_ds.labels, feats.get("val"), evals["val"], device, progress,
             result, out_dir)
    result.train_s = time.perf_counter() - t1
    for name in ("val", "test"):
        if name in feats:
            acc = evaluate(tm, feats[name], evals[name].labels, cfg.eval_batch_size, device)
            setattr(result, f"{name}_acc", acc)
    if out_dir:
        save_delta(tm, out_dir / "delta.safetensors", run_id=run_id,
                   extra_metadata={"method": cfg.method, "model": cfg.model, "data": cfg.data})
    result.total_s = time.perf_counter() - t_start
    return result


def _fit(cfg, tm, train_cache, train_labels, val_cache, val_ds, device, progress, result, out_dir,
         what: str = "training", lr_flag: str = "--lr") -> None:
    delta = tm.delta_dict()
    opt = _optimizer(cfg, list(delta.values()))
    g = torch.Generator().manual_seed(cfg.seed)
    lengths = train_cache.lengths
    steps = math.ceil(len(train_cache) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, steps))
    loss_fn = make_loss(cfg.loss, kappa=cfg.kappa, m=cfg.rsl_m)
    log = (out_dir / "metrics.jsonl").open("w") if out_dir else None
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        total, n = 0.0, 0
        bar = tqdm(bucketed_batches(lengths, cfg.batch_size, g), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, leave=False)
        for step, idx in enumerate(bar, 1):
            state = train_cache.collate(idx, device)
            logits = tm.suffix(state).float()  # the loss in float32 whatever the model's precision
            loss = loss_fn(logits, train_labels[idx].to(device))
            objective = loss + cfg.penalty * squared_norm(delta) if cfg.penalty else loss
            value = float(loss.detach())  # one sync per step, as for the running mean below
            if not math.isfinite(value):
                hint = ", or use --optimizer adam" if cfg.optimizer == "sgd" else ""
                raise TrainingDiverged(
                    f"{what} diverged: the loss is {value} at epoch {epoch + 1}, step {step}; nothing was written. "
                    f"Lower the learning rate (now {lr_flag} {cfg.lr:g}){hint}")
            opt.zero_grad(set_to_none=True)
            objective.backward()
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
