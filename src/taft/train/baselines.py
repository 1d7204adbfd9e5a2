"""The trainable wrapper of each method (TAFT, NLFT, FC, LoRA, (IA)³) and the linear probe (LP-then-FT)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from taft.config import TrainConfig
from taft.models.classifier import Classifier
from taft.tangent_model import TangentModel
from taft.train.cache import FeatureCache
from taft.train.fit import RunResult, fit


def probe_head(cfg: TrainConfig, clf: Classifier, train_feats: FeatureCache, labels: torch.Tensor,
               device) -> None:
    """Linear probe on frozen features (LP-then-FT): the trained head becomes w0 of the head, in place.

    The tangent space of the block is then taken around a head that already separates the classes."""
    fc_cfg = dataclasses.replace(cfg, method="fc", lr=cfg.probe_lr, epochs=cfg.probe_epochs, penalty=0.0,
                                 radius=None, warmup=0.0, schedule="cosine")
    tm = make_tangent_model(fc_cfg, clf).to(device).eval()
    scratch = RunResult(config={}, val_acc=float("nan"), test_acc=None)
    fit(fc_cfg, tm, train_feats, labels, None, None, device, False, scratch, None,
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
        return TangentModel(clf, cfg.scope, linear=cfg.method == "taft", **common,
                            output=cfg.prediction if cfg.method == "taft" else "full")
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
