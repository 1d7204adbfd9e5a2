"""What a data pipeline (text or images) hands the shared training loop, and how both build the classifier."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from taft.config import ConfigError, TrainConfig, class_name_list
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


def pin_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its data paths made absolute (:func:`taft.data.text.pin_spec`), as a run or a store records
    them: reading them again from another folder must find the same files, not others under the same name."""
    from pathlib import Path

    from taft.data.examples import DataError
    from taft.data.text import SENTENCE_TASKS, default_data_root, pin_spec

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).expanduser().absolute())

    data_root = absolute(cfg.data_root)
    if data_root is None and cfg.data.lower() in SENTENCE_TASKS:  # found from the current folder: record where
        with contextlib.suppress(DataError):  # no data folder here: loading will say so
            data_root = str(default_data_root())
    return replace(cfg, data=pin_spec(cfg.data), data_root=data_root, test_file=absolute(cfg.test_file))


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


def given_class_names(cfg: TrainConfig, num_classes: int, *, declarable: bool = False) -> list[str] | None:
    """``cfg.class_names`` as a list, one name per class of the loaded data (None when not given); a count that
    differs from the data's is a :class:`ConfigError` naming both. ``declarable``: the data's classes follow
    ``--num-classes`` (text files), so more names than labels seen may mean classes without examples."""
    names = class_name_list(cfg.class_names)
    if names is not None and len(names) != num_classes:
        hint = (f"; if some classes have no examples, also set --num-classes {len(names)}"
                if declarable and cfg.num_classes is None and len(names) > num_classes else "")
        raise ConfigError(f"class_names gives {len(names)} names but {cfg.data} has {num_classes} classes; give one "
                          f"name per class, in label order, with --class-names{hint}")
    return names
