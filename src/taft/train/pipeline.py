"""What a data pipeline (text or images) hands the shared training loop, and how both build the classifier."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taft.config import TrainConfig
from taft.data.examples import DatasetSplits
from taft.models.classifier import Classifier
from taft.train.cache import FeatureCache


@dataclass
class Prepared:
    """What a pipeline (text or images) hands the shared loop: the splits, the classifier (w0), and
    ``cache_for(tm, dataset, name, progress, cache_dir, key) -> FeatureCache`` (prefix features of one split)."""

    splits: DatasetSplits
    clf: Classifier
    cache_for: Callable[..., FeatureCache]
    data_fingerprint: str = ""  # for cache keys, where example ids alone do not identify the data


def init_classifier(cfg: TrainConfig, backbone: nn.Module, num_classes: int, *, pooling: str, zero_shot: bool,
                    zero_shot_head: Callable[[], Tensor], feature_dim: int | None = None) -> Classifier:
    """Backbone + pooling + head, the head initialized per ``cfg.head_init`` (seeded, so rebuilding is exact):
    ``zero_shot`` — normalized features and the head ``zero_shot_head()`` (called only then; it raises the
    pipeline's own error when it has no class text) —, zeros, or the seeded random init."""
    torch.manual_seed(cfg.seed)
    clf = Classifier(backbone, num_classes, pooling=pooling, normalize=zero_shot, feature_dim=feature_dim)
    if zero_shot:
        clf.set_head(zero_shot_head())
    elif cfg.head_init == "zeros":
        clf.set_head(0.0)
    return clf
