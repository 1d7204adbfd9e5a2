"""Evaluate a finished run from its folder: the base is rebuilt from the config (seeded head), and the
checkpoint's fingerprint guarantees it is the base Δw was trained on."""

from __future__ import annotations

from pathlib import Path

import torch

from taft.checkpoint import load_delta
from taft.config import ConfigError, TrainConfig, load_config
from taft.train.loop import evaluate, make_tangent_model, prepare


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
    device = torch.device(cfg.device)
    prep = prepare(cfg, device)  # text or images, by the data spec
    ds = getattr(prep.splits, split)
    if ds is None:
        raise ConfigError(f"{cfg.data} has no {split} split")
    if cfg.max_eval:  # the run was scored on the first max_eval examples: score the same ones
        ds = ds.subset(range(min(len(ds), cfg.max_eval)))
    clf = prep.clf
    if (run_dir / "base_head.safetensors").is_file():  # a probed head: part of w0, stored with the run
        from safetensors.torch import load_file

        with torch.no_grad():
            for n, t in load_file(str(run_dir / "base_head.safetensors")).items():
                clf.head.get_parameter(n).copy_(t)
    tm = make_tangent_model(cfg, clf).to(device).eval()
    load_delta(tm, run_dir / "delta.safetensors")
    cache = prep.cache_for(tm, ds, split, progress, None, "")
    acc = evaluate(tm, cache, ds.labels, cfg.eval_batch_size, device)
    return {"accuracy": acc, "examples": len(ds), "split": split, "data": cfg.data, "method": cfg.method}
