"""The five real sentence tasks: sizes from the README table, label spaces, validation carving."""

from __future__ import annotations

import warnings

import pytest

from taft.data import SENTENCE_TASKS, load_sentence_task, load_text_dataset, read_label_sentence_file

# README table: file line counts.
FILE_SIZES = {
    "mr": {"train": 9596, "test": 1066},
    "sst2": {"train": 6920, "dev": 872, "test": 1821},
    "sst5": {"train": 8544, "dev": 1101, "test": 2210},
    "subj": {"train": 9000, "test": 1000},
    "trec": {"train": 5452, "test": 500},
}


def _load(task: str, root, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnicodeWarning)  # trec.train.txt has one stray byte (tested below)
        return load_sentence_task(task, root, **kw)


@pytest.mark.parametrize("task", sorted(FILE_SIZES))
def test_file_sizes_match_readme(tasks_root, task):
    for split, size in FILE_SIZES[task].items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnicodeWarning)
            ds = read_label_sentence_file(tasks_root / f"{task}.{split}.txt")
        assert len(ds) == size
        assert ds.name == task
        assert all(i.startswith(f"{split}:") for i in ds.ids)
        assert len(set(ds.ids)) == size


@pytest.mark.parametrize("task", sorted(FILE_SIZES))
def test_load_sentence_task_splits(tasks_root, task):
    spec = SENTENCE_TASKS[task]
    splits = _load(task, tasks_root)
    sizes = FILE_SIZES[task]
    assert len(splits.test) == sizes["test"]
    if "dev" in sizes:
        assert spec.has_dev
        assert (len(splits.train), len(splits.val)) == (sizes["train"], sizes["dev"])
        assert all(i.startswith("dev:") for i in splits.val.ids)
    else:
        assert len(splits.train) + len(splits.val) == sizes["train"]
        assert len(splits.val) == round(0.1 * sizes["train"])
        assert set(splits.train.ids).isdisjoint(splits.val.ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnicodeWarning)
            whole = read_label_sentence_file(tasks_root / f"{task}.train.txt")
        assert set(splits.train.ids) | set(splits.val.ids) == set(whole.ids)
    for ds in (splits.train, splits.val, splits.test):
        assert ds.num_classes == spec.num_classes
        assert ds.class_names == list(spec.class_names)
        labels = ds.labels
        assert labels.dtype.is_floating_point is False
        assert set(labels.tolist()) == set(range(spec.num_classes))  # every class present in every split


def test_registry_metadata():
    assert sorted(SENTENCE_TASKS) == ["mr", "sst2", "sst5", "subj", "trec"]
    assert SENTENCE_TASKS["sst5"].class_names == (
        "very negative",
        "negative",
        "neutral",
        "positive",
        "very positive",
    )
    assert SENTENCE_TASKS["subj"].class_names == ("subjective", "objective")
    assert SENTENCE_TASKS["trec"].class_names[2] == "abbreviation"
    for t in SENTENCE_TASKS.values():
        assert len(t.descriptions) == len(t.class_names) == t.num_classes
        assert len(set(t.descriptions)) == t.num_classes
    assert SENTENCE_TASKS["mr"].descriptions == ("a negative movie review", "a positive movie review")


def test_first_mr_line_parsed(tasks_root):
    first = (tasks_root / "mr.train.txt").read_text(encoding="utf-8").splitlines()[0]
    label, text = first.split(" ", 1)
    ds = read_label_sentence_file(tasks_root / "mr.train.txt")
    assert ds[0].label == int(label)
    assert ds[0].text == text.strip()


def test_validation_split_deterministic_per_seed(tasks_root):
    a = _load("mr", tasks_root, seed=0)
    b = _load("mr", tasks_root, seed=0)
    c = _load("mr", tasks_root, seed=1)
    assert a.val.ids == b.val.ids
    assert a.train.ids == b.train.ids
    assert set(a.val.ids) != set(c.val.ids)
    assert len(a.val) == len(c.val) == 960
    # val_fraction changes the size
    assert len(_load("subj", tasks_root, val_fraction=0.2).val) == 1800


def test_dev_split_ignores_seed(tasks_root):
    assert _load("sst2", tasks_root, seed=0).val.ids == _load("sst2", tasks_root, seed=5).val.ids


def test_trec_stray_byte_is_replaced_with_warning(tasks_root):
    with pytest.warns(UnicodeWarning, match=r"lines \[66\]"):
        ds = read_label_sentence_file(tasks_root / "trec.train.txt")
    assert len(ds) == 5452
    assert ds[65].text == "Which city has the oldest relationship as a sister\ufffdcity with Los Angeles ?"
    assert ds[65].label == 4


def test_real_files_have_duplicates_with_distinct_ids(tasks_root):
    ds = read_label_sentence_file(tasks_root / "sst2.train.txt")
    suffixed = [i for i in ds.ids if "~" in i]
    assert len(suffixed) >= 9  # `sort | uniq -d` finds 9 repeated lines
    assert all(i.split("~")[0] in set(ds.ids) for i in suffixed)


def test_load_text_dataset_by_name_and_folder(tasks_root):
    by_name = load_text_dataset("sst5", root=tasks_root)
    by_folder = load_text_dataset(tasks_root, task="sst5")
    assert by_name.train.ids == by_folder.train.ids
    assert by_folder.train.class_names == list(SENTENCE_TASKS["sst5"].class_names)
    single = load_text_dataset(tasks_root / "mr.train.txt", test=tasks_root / "mr.test.txt")
    assert len(single.train) + len(single.val) == 9596
    assert len(single.test) == 1066
    assert single.train.num_classes == 2


def test_default_root_from_env(tasks_root, monkeypatch):
    monkeypatch.setenv("TAFT_DATA", str(tasks_root))
    assert len(load_sentence_task("mr").test) == 1066
