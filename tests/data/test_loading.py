"""load_text_dataset over every spec kind: files, folders, task names, hf:<name> (with a fake hub)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

import taft
from taft.data import DataError, default_data_root, load_hf_dataset, load_sentence_task, load_text_dataset


def _write(path, lines):
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


TRAIN = [f"{i % 3} training sentence {i}" for i in range(40)]


def test_single_file_with_separate_test(tmp_path):
    train = _write(tmp_path / "toy.txt", TRAIN)
    test = _write(tmp_path / "toy_test.txt", ["0 t0", "4 t1"])
    splits = load_text_dataset(train, test, val_fraction=0.25, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 2)
    # the label space is unified over all files: test has label 4
    assert splits.train.num_classes == splits.val.num_classes == splits.test.num_classes == 5
    assert splits.train.name == "toy"
    assert all(i.startswith("train:") for i in splits.train.ids + splits.val.ids)
    assert all(i.startswith("test:") for i in splits.test.ids)
    again = load_text_dataset(str(train), str(test), val_fraction=0.25, seed=1)
    assert again.val.ids == splits.val.ids
    assert load_text_dataset(train, val_fraction=0.25, seed=2).val.ids != splits.val.ids
    assert load_text_dataset(train).test is None


def test_single_file_with_declared_classes(tmp_path):
    train = _write(tmp_path / "toy.txt", TRAIN)
    splits = load_text_dataset(train, num_classes=4)
    assert splits.train.num_classes == 4
    with pytest.raises(DataError, match=r"label 2 .*range\(0, 2\)"):
        load_text_dataset(train, num_classes=2)


def test_string_labels_share_mapping_across_files(tmp_path):
    rows = [{"text": f"s{i}", "label": "pos" if i % 2 else "neg"} for i in range(10)]
    train = tmp_path / "r.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    test = tmp_path / "r_test.jsonl"
    test.write_text(json.dumps({"text": "t", "label": "pos"}) + "\n", encoding="utf-8")
    splits = load_text_dataset(train, test)
    assert splits.test.class_names == ["neg", "pos"]
    assert splits.test.labels.tolist() == [1]
    test.write_text(json.dumps({"text": "t", "label": "meh"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="unknown label 'meh'"):
        load_text_dataset(train, test)


def test_folder_spec(tmp_path):
    _write(tmp_path / "toy.train.txt", TRAIN)
    _write(tmp_path / "toy.dev.txt", ["1 d0", "2 d1"])
    _write(tmp_path / "toy.test.txt", ["0 t0"])
    splits = load_text_dataset(tmp_path)
    assert splits.sizes() == {"train": 40, "val": 2, "test": 1}
    assert splits.val.ids[0].startswith("dev:")
    _write(tmp_path / "other.train.txt", TRAIN[:5])
    with pytest.raises(DataError, match=r"several tasks \['other', 'toy'\]; pass task="):
        load_text_dataset(tmp_path)
    assert load_text_dataset(tmp_path, task="other").test is None
    assert len(load_text_dataset(tmp_path, task="other", val_fraction=0.4).val) == 2
    with pytest.raises(DataError, match=r"no nope\.train"):
        load_text_dataset(tmp_path, task="nope")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"no <task>\.train"):
        load_text_dataset(tmp_path)


def test_registered_task_in_folder_uses_registry(tmp_path):
    _write(tmp_path / "mr.train.txt", TRAIN[:10])
    _write(tmp_path / "mr.test.txt", ["1 t"])
    with pytest.raises(DataError, match=r"label 2 .*\['negative', 'positive'\]"):
        load_text_dataset(tmp_path)
    _write(tmp_path / "mr.train.txt", [f"{i % 2} s{i}" for i in range(10)])
    splits = load_text_dataset(tmp_path)
    assert splits.train.class_names == ["negative", "positive"]
    assert splits.sizes() == {"train": 9, "val": 1, "test": 1}


def test_unknown_task_and_spec(tmp_path):
    with pytest.raises(DataError) as err:
        load_sentence_task("imdb", tmp_path)
    msg = str(err.value)
    assert "unknown task 'imdb'" in msg
    assert "mr, sst2, sst5, subj, trec" in msg
    assert "A path works too" in msg
    with pytest.raises(DataError, match=r"unknown dataset 'imdb'.*hf:<name>"):
        load_text_dataset("imdb")
    with pytest.raises(DataError, match=r"data file not found.*Files in"):
        load_text_dataset(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="single-file spec only"):
        load_text_dataset("mr", tmp_path / "x.txt")


def test_task_files_missing_in_root(tmp_path):
    _write(tmp_path / "sst2.train.txt", ["1 a"])
    with pytest.raises(DataError, match=r"sst2\.dev\.txt\. Files in .*: sst2\.train\.txt"):
        load_sentence_task("sst2", tmp_path)


def test_default_root(tmp_path, monkeypatch, tasks_root):
    repo = Path(__file__).resolve().parents[2]
    if not Path(taft.__file__).resolve().is_relative_to(repo / "src"):
        pytest.skip("taft is not installed editable from this checkout; the repo-relative fallback does not apply")
    monkeypatch.delenv("TAFT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # ../shared from here does not exist: falls back to the repo's sibling
    assert default_data_root() == tasks_root.resolve()
    monkeypatch.setenv("TAFT_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"\$TAFT_DATA points to .*nope"):
        default_data_root()


# --- hf:<name> with a fake `datasets` module (no network, `datasets` not installed) --------------------


class _Split:
    def __init__(self, columns, features=None):
        self._columns = columns
        self.column_names = list(columns)
        self.features = features or {}

    def __getitem__(self, key):
        return self._columns[key]


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_success_with_class_label(monkeypatch):
    calls = []
    names = types.SimpleNamespace(names=["negative", "positive"])

    def load_dataset(name, config=None):
        calls.append((name, config))
        train = _Split(
            {"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, {"label": names}
        )
        return {
            "train": train,
            "validation": _Split({"sentence": ["v0", "v1"], "label": [1, 0]}),
            "test": _Split({"sentence": ["t0", "t1"], "label": [-1, -1]}),  # GLUE-style hidden labels
        }

    _fake_datasets(monkeypatch, load_dataset)
    splits = load_text_dataset("hf:nyu-mll/glue", hf_config="sst2", text_column="sentence")
    assert calls == [("nyu-mll/glue", "sst2")]
    assert splits.sizes() == {"train": 20, "val": 2, "test": None}
    assert splits.train.class_names == ["negative", "positive"]
    assert splits.train.name == "glue"
    assert splits.val.labels.tolist() == [1, 0]
    assert splits.val.ids[0].startswith("validation:")
    with pytest.raises(DataError, match=r"missing column\(s\) \['text'\]; available columns: \['sentence', 'label'\]"):
        load_hf_dataset("nyu-mll/glue", config="sst2")


def test_hf_carves_val_and_keeps_test(monkeypatch):
    def load_dataset(name, config=None):
        return {
            "train": _Split({"text": [f"s{i}" for i in range(10)], "label": ["a", "b"] * 5}),
            "test": _Split({"text": ["t"], "label": ["b"]}),
        }

    _fake_datasets(monkeypatch, load_dataset)
    splits = load_text_dataset("hf:toy", val_fraction=0.3, seed=0)
    assert splits.sizes() == {"train": 7, "val": 3, "test": 1}
    assert splits.test.class_names == ["a", "b"]
    assert splits.test.labels.tolist() == [1]


def test_hf_offline_error_is_wrapped(monkeypatch):
    def load_dataset(name, config=None):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(DataError) as err:
        load_text_dataset("hf:stanfordnlp/imdb")
    msg = str(err.value)
    assert "'stanfordnlp/imdb'" in msg
    assert "Couldn't reach" in msg
    assert "hub is unreachable" in msg
    assert "pass a local path" in msg
    assert isinstance(err.value.__cause__, ConnectionError)


def test_hf_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_text_dataset("hf:stanfordnlp/imdb")
