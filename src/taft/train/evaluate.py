"""Evaluate a finished run from its folder: the base is rebuilt from the config (seeded head), and the
checkpoint's fingerprint guarantees it is the base Δw was trained on.

The folder is first checked against its ``run.json`` manifest (:func:`taft.train.rundir.verify_run`), so a
folder mixing files of two runs is refused. The run's ``max_eval`` is honoured, as at training time."""

from __future__ import annotations

from pathlib import Path

import torch

from taft.checkpoint import load_delta, read_delta
from taft.config import ConfigError, TrainConfig, load_config
from taft.data.examples import DataError, check_digests
from taft.train.loop import evaluate, make_tangent_model, prepare
from taft.train.rundir import RunDirError, verify_run


def evaluate_run(run_dir: str | Path, *, data: str | None = None, split: str = "test",
                 progress: bool = False) -> dict:
    if split not in ("val", "test"):
        raise ConfigError(f"split={split!r}: use val or test")
    run_dir = Path(run_dir).expanduser()
    manifest = verify_run(run_dir)
    _, meta = read_delta(run_dir / "delta.safetensors")
    if meta.get("run_id") != manifest["run_id"]:
        raise RunDirError(f"{run_dir}: delta.safetensors belongs to run {meta.get('run_id')}, the folder's run.json "
                          f"to run {manifest['run_id']}; train the run again")
    cfg: TrainConfig = load_config(TrainConfig, run_dir / "config.yaml")
    if data:  # the run's test file belongs to its own data
        cfg.data, cfg.test_file = data, None
    device = torch.device(cfg.device)
    if device.type != "cpu" and not _available(device):
        cfg.device, device = "cpu", torch.device("cpu")  # trained on an accelerator this machine lacks; Δw is the same
    prep = prepare(cfg, device)  # text or images, by the data spec
    if not data:  # the run's own data: the same files it was trained and validated on
        check_digests(manifest.get("data_digest"), prep.splits, [split], what=f"the run {run_dir}", spec=cfg.data,
                      extra=prep.data_fingerprint)
    ds = getattr(prep.splits, split)
    if ds is None:
        raise ConfigError(f"{cfg.data} has no {split} split")
    clf = prep.clf
    trained = manifest.get("num_classes")
    if trained and clf.head.out_features != trained:
        raise DataError(f"--data {cfg.data} has {clf.head.out_features} classes, but the run was trained on "
                        f"{trained}; evaluate on data with the same classes")
    if "base_head.safetensors" in manifest["files"]:  # a probed head: part of w0, stored with the run
        from safetensors.torch import load_file

        with torch.no_grad():
            for n, t in load_file(str(run_dir / "base_head.safetensors")).items():
                clf.head.get_parameter(n).copy_(t)
    tm = make_tangent_model(cfg, clf).to(device).eval()
    load_delta(tm, run_dir / "delta.safetensors")
    available = len(ds)
    if cfg.max_eval is not None and cfg.max_eval < available:  # as at training time: the first max_eval examples
        ds = ds.subset(range(cfg.max_eval))
    cache = prep.cache_for(tm, ds, split, progress, None, "")
    acc = evaluate(tm, cache, ds.labels, cfg.eval_batch_size, device)
    return {"accuracy": acc, "examples": len(ds), "available": available, "max_eval": cfg.max_eval,
            "split": split, "data": cfg.data, "method": cfg.method, "run_id": manifest["run_id"]}


def _available(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return False
