"""What a data pipeline (text or images) hands the shared training loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
