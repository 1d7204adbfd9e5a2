"""Fine-tuning runs, orchestrated: TAFT and its baselines through one loop on cached frozen-prefix features.

``train(cfg)`` builds the classifier (backbone + pooling + head), wraps it in a :class:`TangentModel`
(``linear=True`` for TAFT, ``False`` for NLFT / FC / LoRA / adapters), caches the frozen prefix once per split,
trains Δw and writes ``delta.safetensors``, ``config.yaml``, ``metrics.jsonl``, ``results.json`` and last the
``run.json`` manifest — into a staging folder that replaces ``output_dir`` only when complete
(:mod:`taft.train.rundir`). A non-finite loss stops the run with a :class:`TrainingDiverged` error.

The pieces: the text pipeline (:mod:`taft.train.text`) and the image one (:mod:`taft.train.images`) behind
:class:`~taft.train.pipeline.Prepared`; each method's wrapper and the linear probe (:mod:`taft.train.baselines`);
the step loop (:mod:`taft.train.fit`). This module only puts them in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from taft.checkpoint import save_delta
from taft.config import ConfigError, TrainConfig, parse_device, save_config
from taft.data.examples import check_label_space, split_digests
from taft.train.baselines import make_tangent_model, probe_head
from taft.train.cache import FeatureCache, cache_info, cache_key
from taft.train.distributed import Ranks, check_same, config_digest, joined, on_rank0, owned, shard_view, weights_digest
from taft.train.fit import RunResult, TrainingDiverged, evaluate, fit
from taft.train.pipeline import Prepared, pin_paths
from taft.train.rundir import RunFolder, ensure_writable_folder, write_json
from taft.train.text import ZERO_SHOT_SCALE, build_classifier, encode_texts, prepare_text

__all__ = ["ZERO_SHOT_SCALE", "RunResult", "TrainingDiverged", "build_classifier", "evaluate", "make_tangent_model",
           "prepare", "resolve_device", "encode_texts", "train"]


def resolve_device(name: str) -> torch.device:
    """``name`` as a device that exists on this machine, or a :class:`ConfigError` saying what does (also for a
    name that is no device taft runs on: ``gpu0``, ``cuda:007``)."""
    dev = parse_device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r}: no CUDA GPU is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r}: this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device={name!r}: MPS is not available here; use --device cpu")
    return dev


def prepare(cfg: TrainConfig, device: torch.device) -> Prepared:
    """Data and classifier for ``cfg``: the one switch between the text and image pipelines (by the data spec).
    The classifier is built in float32 (its zero-shot head too) and then cast to ``cfg.dtype``."""
    from taft.train.images import is_image_spec, prepare_images

    prep = prepare_images(cfg, device) if is_image_spec(cfg.data) else prepare_text(cfg, device)
    prep.clf.to(getattr(torch, cfg.dtype))
    return prep


# -- the run ----------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, *, progress: bool = True, caches: dict | None = None,
          evaluate_test: bool = True) -> RunResult:
    """Run ``cfg`` end to end. ``caches`` (a dict) lets several runs share prefix features in one process.

    ``evaluate_test=False`` never touches the test split (no features, no accuracy): hyperparameter search
    runs its candidates this way and scores only the selected one on test.

    With ``cfg.output_dir`` the folder is checked first (before features are computed) and written only when the
    run is complete: any error, a diverged loss included, leaves it as it was."""
    cfg = pin_paths(cfg)  # the data a run records is the data it read, from any folder
    with joined(cfg.device) as (ranks, device_name):  # under torchrun: this process's rank and its device
        device = resolve_device(device_name)
        if cfg.cache == "disk":
            cache_dir = Path(cfg.cache_dir).expanduser()
            ensure_writable_folder(cache_dir, f"--cache-dir {cache_dir}", ConfigError)
        if not cfg.output_dir:
            return _run(cfg, device, progress, caches, None, None, evaluate_test, ranks)
        # rank 0 alone writes the run; a folder it refuses stops every rank
        folder = on_rank0(lambda: RunFolder(cfg.output_dir, overwrite=cfg.overwrite), ranks)
        with folder if folder is not None else contextlib.nullcontext():
            result = _run(cfg, device, progress, caches, folder and folder.path, folder and folder.run_id,
                          evaluate_test, ranks)
            result.output_dir = str(Path(cfg.output_dir).expanduser().absolute())

            def commit() -> None:
                result.output_dir = str(folder.target)
                write_json(folder.path / "results.json", result.to_dict())
                folder.commit(num_classes=result.num_classes, method=cfg.method, model=cfg.model, data=cfg.data,
                              data_digest=result.data_digest)

            on_rank0(commit, ranks)
        return result


# Private training lives a layer above this one (taft.privacy); it registers its planner and its step loop here
# when it is imported, which ``import taft`` always does first. The loop never imports upward.
_PRIVATE: dict[str, Callable] = {}


def register_private_training(*, plan: Callable, fit: Callable) -> None:
    """Install private training: ``plan(cfg, n) -> plan`` (σ calibrated before any feature is computed) and
    ``fit(cfg, plan, tm, train_cache, train_labels, val_cache, val_ds, device, progress, result, out_dir)``."""
    _PRIVATE.update(plan=plan, fit=fit)


def _private(part: str) -> Callable:
    if part not in _PRIVATE:
        raise ConfigError("dp_epsilon: private training is not installed (import taft.privacy first)")
    return _PRIVATE[part]


def _run(cfg: TrainConfig, device: torch.device, progress: bool, caches: dict | None, out_dir: Path | None,
         run_id: str | None, evaluate_test: bool = True, ranks: Ranks = Ranks()) -> RunResult:
    t_start = time.perf_counter()
    progress = progress and ranks.main
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
    digests = split_digests(splits if evaluate_test else dataclasses.replace(splits, test=None), prep.data_fingerprint)
    if ranks.many:  # every rank trains the same thing, or none does
        check_same({"config": config_digest(cfg), "data": json.dumps(digests, sort_keys=True),
                    "model weights": weights_digest(clf)}, ranks)

    def mine(ds):  # the examples of a split this rank holds (all of them in one process)
        return ds.subset(owned(len(ds), ranks)) if ranks.many else ds

    plan = None
    if cfg.dp_epsilon is not None:  # private run: planned (σ calibrated, bad targets refused) before any features
        plan = _private("plan")(cfg, len(train_ds))
    cache_dir = Path(cfg.cache_dir) if cfg.cache == "disk" else None
    if cfg.head_init == "probe" and cfg.method not in ("fc", "zero-shot"):
        t_probe = time.perf_counter()
        probe_tm = make_tangent_model(dataclasses.replace(cfg, method="fc"), clf).to(device).eval()
        # same key as an FC run's training features: the probe *is* that run (shared across runs of a task)
        ck = (cache_key(probe_tm, cfg, mine(train_ds), prep.data_fingerprint), "train")
        if ck not in caches:
            # The training set goes through the encoder once: its features at the run's own start (cached under the
            # key the run looks up below; the head the probe changes comes after them), advanced through the
            # frozen stages that remain before the head.
            pre_tm = make_tangent_model(cfg, clf).to(device).eval()
            key = cache_key(pre_tm, cfg, mine(train_ds), prep.data_fingerprint)
            if (key, "train") not in caches:
                caches[(key, "train")] = _features(prep, pre_tm, mine(train_ds), "train", progress, cache_dir, key)
            caches[ck] = caches[(key, "train")].advance(probe_tm, pre_tm.start, batch_size=cfg.eval_batch_size,
                                                        device=device, progress=progress,
                                                        info=cache_info(probe_tm, cfg))
        probe_head(cfg, clf, shard_view(caches[ck], len(train_ds), ranks), train_ds.labels, device)
        probe_s = time.perf_counter() - t_probe
    else:
        probe_s = 0.0
    tm = make_tangent_model(cfg, clf).to(device).eval()  # eval: no dropout, f_lin is deterministic

    t0 = time.perf_counter()
    feats = {}
    for name, ds in (("train", train_ds), *evals.items()):
        if ds is None:
            continue
        key = cache_key(tm, cfg, mine(ds), prep.data_fingerprint)
        ck = (key, name)
        if ck not in caches:
            caches[ck] = _features(prep, tm, mine(ds), name, progress, cache_dir, key)
        feats[name] = shard_view(caches[ck], len(ds), ranks)
    cache_s = time.perf_counter() - t0 + probe_s
    if cfg.cache == "none":
        caches.clear()

    result = RunResult(config=dataclasses.asdict(cfg), val_acc=float("nan"), test_acc=None,
                       device=str(device), cache_s=cache_s, num_classes=int(clf.head.out_features),
                       trainable_params=sum(d.numel() for d in tm.delta_dict().values()),
                       data_digest=digests, world_size=ranks.world)  # (a search candidate never reads test)
    if out_dir:
        save_config(cfg, out_dir / "config.yaml")
        if cfg.head_init == "probe":  # part of w0 that cannot be rebuilt from the config alone
            save_file({n: p.detach().cpu().contiguous() for n, p in clf.head.named_parameters()},
                      str(out_dir / "base_head.safetensors"))

    t1 = time.perf_counter()
    if plan is not None:
        _private("fit")(cfg, plan, tm, feats["train"], train_ds.labels, feats.get("val"), evals["val"], device,
                        progress, result, out_dir)
    elif cfg.method != "zero-shot":
        fit(cfg, tm, feats["train"], train_ds.labels, feats.get("val"), evals["val"], device, progress,
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


def _features(prep: Prepared, tm, ds, name: str, progress: bool, cache_dir: Path | None, key: str) -> FeatureCache:
    """Prefix features of ``ds`` (a rank may hold no example of a small split: an empty cache)."""
    if len(ds) == 0:
        return FeatureCache([], ids=[])
    return prep.cache_for(tm, ds, name, progress, cache_dir, key)
