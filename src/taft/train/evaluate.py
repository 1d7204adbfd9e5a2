"""Evaluate a finished run from its folder: the base is rebuilt from the config (seeded head), and the
checkpoint's fingerprint guarantees it is the base Δw was trained on."""

from __future__ import annotations

from pathlib import Path

import torch

from taft.checkpoint import load_delta
from taft.config import ConfigError, TrainConfig, load_config
from taft.data.text import SENTENCE_TASKS, load_text_dataset
from taft.train.loop import _cache_for, build_classifier, evaluate, make_tangent_model
from taft.zoo import load_model, load_tokenizer


def evaluate_run(run_dir: str | Path, *, data: str | None = None, split: str = "test",
                 progress: bool = False) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: pass the output folder of `taft train`")
    cfg: TrainConfig = load_config(TrainConfig, run_dir / "config.yaml")
    if data:
        cfg.data = data
    if split not in ("val", "test"):
        raise ConfigError(f"split={split!r}: use val or test")
    splits = load_text_dataset(cfg.data, cfg.test_file, root=cfg.data_root, seed=cfg.seed,
                               num_classes=cfg.num_classes)
    ds = getattr(splits, split)
    if ds is None:
        raise ConfigError(f"{cfg.data} has no {split} split")
    task = SENTENCE_TASKS.get(cfg.data)
    descriptions = list(task.descriptions) if task else (list(splits.train.class_names or []) or None)
    tokenizer = load_tokenizer(cfg.model)
    device = torch.device(cfg.device)
    clf = build_classifier(cfg, load_model(cfg.model).to(device), tokenizer, splits.train.num_classes,
                           descriptions).to(device)
    tm = make_tangent_model(cfg, clf).to(device).eval()
    load_delta(tm, run_dir / "delta.safetensors")
    cache = _cache_for(tm, tokenizer, ds, cfg, split, progress, None, "")
    acc = evaluate(tm, cache, ds.labels, cfg.eval_batch_size, device)
    return {"accuracy": acc, "examples": len(ds), "split": split, "data": cfg.data, "method": cfg.method}
