"""Stable ids, TextDataset behaviour, carving a validation split."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from taft.data import (
    DataError,
    DatasetSplits,
    TextDataset,
    TextExample,
    carve_validation,
    example_id,
    read_label_sentence_file,
)

LINES = ["1 a gripping film", "0 dull and long", "1 a gripping film", "0 a gripping film", "1 warm , funny"]


def _write(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_example_id_format_and_repeats():
    seen: dict = {}
    digest = hashlib.sha1(b"1\ta gripping film").hexdigest()[:12]
    assert example_id("a gripping film", 1, seen, split="train") == f"train:{digest}"
    assert example_id("a gripping film", 1, seen, split="train") == f"train:{digest}~1"
    assert example_id("a gripping film", 1, seen, split="train") == f"train:{digest}~2"
    # the label is part of the key: same text, other label, is a first occurrence
    assert example_id("a gripping film", 0, seen) == hashlib.sha1(b"0\ta gripping film").hexdigest()[:12]
    assert example_id("a gripping film", 1, {}) == digest


def test_ids_independent_of_line_order(tmp_path):
    base = read_label_sentence_file(_write(tmp_path / "t.train.txt", LINES))
    shuffled = LINES[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != LINES
    other = read_label_sentence_file(_write(tmp_path / "u.train.txt", shuffled))
    assert set(base.ids) == set(other.ids)
    by_id = {ex.id: ex for ex in base}
    assert all(by_id[ex.id] == ex for ex in other)


def test_ids_of_real_file_survive_shuffle(tmp_path, tasks_root):
    lines = (tasks_root / "subj.test.txt").read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    shuffled = read_label_sentence_file(_write(tmp_path / "subj.test.txt", lines))
    original = read_label_sentence_file(tasks_root / "subj.test.txt")
    assert set(shuffled.ids) == set(original.ids)
    assert len(set(original.ids)) == 1000


def test_duplicate_lines_get_distinct_ids(tmp_path):
    ds = read_label_sentence_file(_write(tmp_path / "t.train.txt", LINES))
    assert len(ds) == 5
    assert len(set(ds.ids)) == 5
    assert ds.ids[2] == ds.ids[0] + "~1"
    assert "~" not in ds.ids[3]  # same text, other label
    assert ds.ids[0].startswith("train:")


def test_text_dataset_accessors(tmp_path):
    ds = read_label_sentence_file(_write(tmp_path / "t.train.txt", LINES), num_classes=3)
    assert ds.num_classes == 3
    assert ds.texts[1] == "dull and long"
    assert torch.equal(ds.labels, torch.tensor([1, 0, 1, 0, 1]))
    assert ds.labels.dtype == torch.long
    assert isinstance(ds[4], TextExample)
    assert ds[4].text == "warm , funny"


def test_subset_by_ids_and_indices(tmp_path):
    ds = read_label_sentence_file(_write(tmp_path / "t.train.txt", LINES))
    by_index = ds.subset([4, 1])
    assert by_index.texts == ["warm , funny", "dull and long"]
    assert by_index.num_classes == ds.num_classes
    by_id = ds.subset([ds.ids[4], ds.ids[1]])
    assert by_id.ids == by_index.ids
    assert ds.subset(torch.tensor([0, 2])).ids == [ds.ids[0], ds.ids[2]]
    assert len(ds.subset([])) == 0
    with pytest.raises(DataError, match="unknown example id"):
        ds.subset(["train:nope"])
    with pytest.raises(DataError, match="out of range"):
        ds.subset([5])
    with pytest.raises(DataError, match="repeats"):
        ds.subset([0, 0])
    with pytest.raises(DataError, match="all ids"):
        ds.subset([0, "x"])


def test_text_dataset_validates():
    ex = TextExample("a", "x", 2)
    with pytest.raises(DataError, match="label 2"):
        TextDataset("d", [ex], num_classes=2)
    with pytest.raises(DataError, match="duplicate example id a"):
        TextDataset("d", [ex, ex], num_classes=3)
    with pytest.raises(DataError, match="class names"):
        TextDataset("d", [ex], num_classes=3, class_names=["x", "y"])


def test_carve_validation(tmp_path):
    lines = [f"{i % 2} sentence number {i}" for i in range(50)]
    ds = read_label_sentence_file(_write(tmp_path / "t.train.txt", lines))
    train, val = carve_validation(ds, 0.2, seed=7)
    assert (len(train), len(val)) == (40, 10)
    assert set(train.ids).isdisjoint(val.ids)
    assert set(train.ids) | set(val.ids) == set(ds.ids)
    # both parts keep file order
    order = {id_: i for i, id_ in enumerate(ds.ids)}
    assert [order[i] for i in val.ids] == sorted(order[i] for i in val.ids)
    assert carve_validation(ds, 0.2, seed=7)[1].ids == val.ids
    assert carve_validation(ds, 0.2, seed=8)[1].ids != val.ids
    assert len(carve_validation(ds, 0.001, seed=0)[1]) == 1  # never empty
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match="val_fraction"):
            carve_validation(ds, bad, seed=0)
    with pytest.raises(DataError, match="at least 2"):
        carve_validation(ds.subset([0]), 0.5, seed=0)


def test_dataset_splits_sizes(tmp_path):
    ds = read_label_sentence_file(_write(tmp_path / "t.train.txt", LINES))
    splits = DatasetSplits(ds, ds.subset([0]))
    assert splits.sizes() == {"train": 5, "val": 1, "test": None}


def test_data_error_is_a_taft_value_error():
    from taft.errors import TaftError

    assert issubclass(DataError, TaftError)
    assert issubclass(DataError, ValueError)
