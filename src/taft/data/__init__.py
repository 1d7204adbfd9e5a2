"""Data loading for taft: labelled text and images with stable ids, splits and hash-based shards.

Text: :func:`load_text_dataset` takes a task name (``mr``, ``sst2``, ``sst5``, ``subj``, ``trec``), a folder,
a ``.txt``/``.csv``/``.jsonl`` file or ``hf:<name>`` and returns :class:`DatasetSplits` of
:class:`TextDataset`. Images: :func:`load_image_folder` / :func:`load_torchvision_dataset` yield
``(image, label, id)``. :func:`split_into_shards` partitions any of them by id.
"""

from __future__ import annotations

from taft.data.examples import (
    DataError,
    DatasetSplits,
    TextDataset,
    TextExample,
    carve_validation,
    example_id,
)
from taft.data.formats import read_csv, read_jsonl, read_label_sentence_file, read_text_file
from taft.data.hub import load_hf_dataset
from taft.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    IndexedImageDataset,
    load_image_folder,
    load_torchvision_dataset,
    model_transform,
)
from taft.data.shards import assign_shards, shard_of, split_into_shards
from taft.data.text import (
    SENTENCE_TASKS,
    SentenceTask,
    default_data_root,
    load_sentence_task,
    load_text_dataset,
)

__all__ = [
    "DataError",
    "DatasetSplits",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "IndexedImageDataset",
    "SENTENCE_TASKS",
    "SentenceTask",
    "TextDataset",
    "TextExample",
    "assign_shards",
    "carve_validation",
    "default_data_root",
    "example_id",
    "load_hf_dataset",
    "load_image_folder",
    "load_sentence_task",
    "load_text_dataset",
    "load_torchvision_dataset",
    "model_transform",
    "read_csv",
    "read_jsonl",
    "read_label_sentence_file",
    "read_text_file",
    "shard_of",
    "split_into_shards",
]
