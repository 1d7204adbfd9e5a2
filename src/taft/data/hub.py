"""Hugging Face ``datasets`` loading for ``hf:<name>`` specs.

``datasets`` is an optional dependency (``pip install 'taft[hf]'``) imported lazily, so the rest of
``taft.data`` works on machines without it. Project machines are usually offline, so every failure of
``load_dataset`` is wrapped in a :class:`DataError` that says to pass a local path instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taft.data.examples import DataError, DatasetSplits, TextDataset, carve_validation
from taft.data.formats import map_labels, records_to_dataset

VAL_SPLIT_NAMES = ("validation", "dev", "val")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "loading an 'hf:<name>' dataset needs the Hugging Face `datasets` package: "
            "pip install datasets (or pip install 'taft[hf]'); or pass a local path instead"
        ) from e
    return datasets


def _convert(
    split_ds: Any,
    *,
    source: str,
    name: str,
    split: str,
    text_column: str,
    label_column: str,
    num_classes: int | None,
    label_names: Sequence[str] | None,
) -> TextDataset:
    columns = list(split_ds.column_names)
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; available columns: {columns}. "
            f"Pass text_column=/label_column= to pick others."
        )
    rows = zip(split_ds[text_column], split_ds[label_column], strict=True)
    records = [(f"row {i}", text, label) for i, (text, label) in enumerate(rows)]
    mapped, names = map_labels(records, source=source, label_names=label_names)
    return records_to_dataset(
        mapped, source=source, name=name, split=split, num_classes=num_classes, class_names=names
    )


def load_hf_dataset(
    name: str,
    *,
    config: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetSplits[TextDataset]:
    """Load a hub dataset by name into train/val/test.

    Val is the ``validation``/``dev``/``val`` split when present, else carved from train as for local files.
    A test split whose labels are all negative (GLUE-style hidden labels) is dropped (``test=None``): it
    cannot be scored. Class names come from a ``ClassLabel`` feature when the dataset has one.
    """
    datasets = _import_datasets()
    shown = f"{name!r}" + (f" (config {config!r})" if config else "")
    try:
        dd = datasets.load_dataset(name, config)
    except Exception as e:  # network, auth, missing dataset: all end the same way for the user
        raise DataError(
            f"could not load Hugging Face dataset {shown}: {type(e).__name__}: {e}. "
            f"If the hub is unreachable (offline machine), download the data and pass a local path: "
            f"a folder of <task>.train.txt files, or a .txt/.csv/.jsonl file."
        ) from e
    available = list(dd.keys())
    if "train" not in available:
        raise DataError(f"Hugging Face dataset {shown} has no 'train' split; splits: {available}")
    feature = getattr(dd["train"], "features", {}).get(label_column)
    names = label_names if label_names is not None else getattr(feature, "names", None)
    short = name.split("/")[-1]

    def convert(split: str, names: Sequence[str] | None, k: int | None) -> TextDataset:
        return _convert(
            dd[split],
            source=f"hf:{name}[{split}]",
            name=short,
            split=split,
            text_column=text_column,
            label_column=label_column,
            num_classes=k,
            label_names=names,
        )

    train = convert("train", names, num_classes)
    # Later splits share train's label space, so string labels map to the same integers everywhere.
    names, k = train.class_names, train.num_classes
    val_split = next((s for s in VAL_SPLIT_NAMES if s in available), None)
    if val_split is not None:
        val = convert(val_split, names, k)
    else:
        train, val = carve_validation(train, val_fraction, seed)
    test = None
    if "test" in available:
        labels = list(dd["test"][label_column]) if label_column in dd["test"].column_names else []
        hidden = bool(labels) and all(isinstance(v, int) and v < 0 for v in labels)
        test = None if hidden else convert("test", names, k)
    return DatasetSplits(train, val, test)
