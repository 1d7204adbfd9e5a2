"""Text classification data: the sentence-task registry and the loaders that turn a spec into splits.

A *spec* is what a user types on the command line: a registered task name (``mr``), a folder holding
``<task>.train.txt`` (and ``.dev``/``.test``) files, a single ``.txt``/``.csv``/``.jsonl`` file, or
``hf:<name>``. Everything ends up as a :class:`DatasetSplits` of :class:`TextDataset` with stable ids, and a
validation split always exists: the file's own dev split when it has one, else a fixed seeded carve of train.
The readers themselves live in :mod:`taft.data.formats` and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from taft.data.examples import DataError, DatasetSplits, TextDataset, carve_validation
from taft.data.formats import (
    TEXT_SUFFIXES,
    infer_name_and_split,
    read_csv,
    read_jsonl,
    read_label_sentence_file,
    read_text_file,
)
from taft.data.hub import load_hf_dataset

__all__ = [
    "DATA_ENV_VAR",
    "SENTENCE_TASKS",
    "SentenceTask",
    "default_data_root",
    "load_sentence_task",
    "load_text_dataset",
    "pin_spec",
    "read_csv",
    "read_jsonl",
    "read_label_sentence_file",
    "read_text_file",
]

DATA_ENV_VAR = "TAFT_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[3]
_SHARED_TASKS = Path("shared") / "data" / "sentence-tasks"


@dataclass(frozen=True)
class SentenceTask:
    """A registered sentence-classification task. ``descriptions`` are short natural-language phrases, one
    per class, for zero-shot heads built from a text encoder (``"a negative movie review"``)."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    descriptions: tuple[str, ...]
    has_dev: bool = False

    def file(self, split: str) -> str:
        return f"{self.name}.{split}.txt"


SENTENCE_TASKS: dict[str, SentenceTask] = {
    t.name: t
    for t in (
        SentenceTask(
            "mr", 2, ("negative", "positive"), ("a negative movie review", "a positive movie review")
        ),
        SentenceTask(
            "sst2",
            2,
            ("negative", "positive"),
            ("a negative movie review", "a positive movie review"),
            has_dev=True,
        ),
        SentenceTask(
            "sst5",
            5,
            ("very negative", "negative", "neutral", "positive", "very positive"),
            (
                "a very negative movie review",
                "a negative movie review",
                "a neutral movie review",
                "a positive movie review",
                "a very positive movie review",
            ),
            has_dev=True,
        ),
        SentenceTask(
            "subj",
            2,
            ("subjective", "objective"),
            ("a subjective opinion", "an objective plot description"),
        ),
        SentenceTask(
            "trec",
            6,
            ("description", "entity", "abbreviation", "human", "location", "numeric"),
            (
                "a question asking for a description",
                "a question asking about an entity",
                "a question asking for an abbreviation",
                "a question asking about a person",
                "a question asking about a location",
                "a question asking for a number",
            ),
        ),
    )
}


def _task(name: str) -> SentenceTask:
    task = SENTENCE_TASKS.get(name.lower())
    if task is None:
        raise DataError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(SENTENCE_TASKS))}. A path works too: "
            f"load_text_dataset('path/to/folder') for a folder of <task>.train.txt files, or a "
            f".txt/.csv/.jsonl file, or 'hf:<name>'."
        )
    return task


def default_data_root() -> Path:
    """Folder holding the sentence-task files: ``$TAFT_DATA``, else ``../shared/data/sentence-tasks`` from
    the current directory, else the same path beside the repository this package was installed from."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"${DATA_ENV_VAR} points to {root}, which is not a folder")
        return root
    candidates = [Path.cwd().parent / _SHARED_TASKS, _REPO_ROOT.parent / _SHARED_TASKS]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"no sentence-task data folder found (tried {tried}); set {DATA_ENV_VAR}=/path/to/sentence-tasks "
        f"or pass root="
    )


def load_sentence_task(
    task: str, root: str | Path | None = None, *, val_fraction: float = 0.1, seed: int = 0
) -> DatasetSplits[TextDataset]:
    """Load a registered task (see :data:`SENTENCE_TASKS`) from ``root``.

    sst2/sst5 use their own dev file as val (``val_fraction``/``seed`` unused); mr/subj/trec carve
    ``val_fraction`` of train with ``seed``, so train + val together are exactly the train file.
    """
    spec = _task(task)
    folder = Path(root).expanduser() if root is not None else default_data_root()

    def read(split: str) -> TextDataset:
        return read_label_sentence_file(
            folder / spec.file(split),
            num_classes=spec.num_classes,
            name=spec.name,
            split=split,
            class_names=spec.class_names,
        )

    train = read("train")
    if spec.has_dev:
        val = read("dev")
    else:
        train, val = carve_validation(train, val_fraction, seed)
    return DatasetSplits(train, val, read("test"))


def _assemble(
    train_path: Path,
    val: tuple[Path, str] | None,
    test: tuple[Path, str] | None,
    *,
    name: str,
    num_classes: int | None,
    label_names: Sequence[str] | None,
    text_column: str,
    label_column: str,
    val_fraction: float,
    seed: int,
) -> DatasetSplits[TextDataset]:
    """Read train (+ val, test) files into one label space; carve val from train when there is no file."""
    columns = {"text_column": text_column, "label_column": label_column, "name": name}
    train = read_text_file(
        train_path, split="train", num_classes=num_classes, label_names=label_names, **columns
    )
    # String labels seen in train fix the mapping for the other files ("pos" must mean the same class).
    names = train.class_names
    parts: dict[str, TextDataset] = {}
    for key, found in (("val", val), ("test", test)):
        if found is not None:
            path, split = found
            parts[key] = read_text_file(
                path, split=split, num_classes=num_classes, label_names=names, **columns
            )
    if num_classes is None:  # unify inferred label spaces: max(label) + 1 over all files
        k = max([train.num_classes] + [d.num_classes for d in parts.values()])
        train = replace(train, num_classes=k)
        parts = {key: replace(d, num_classes=k) for key, d in parts.items()}
    val_ds = parts.get("val")
    if val_ds is None:
        train, val_ds = carve_validation(train, val_fraction, seed)
    return DatasetSplits(train, val_ds, parts.get("test"))


def _find_split(folder: Path, task: str, splits: Sequence[str]) -> tuple[Path, str] | None:
    for split in splits:
        for suffix in TEXT_SUFFIXES:
            path = folder / f"{task}.{split}{suffix}"
            if path.is_file():
                return path, split
    return None


def _load_folder(folder: Path, task: str | None, **options) -> DatasetSplits[TextDataset]:
    tasks = sorted(
        {
            p.name.split(".")[0]
            for p in folder.iterdir()
            if p.is_file() and p.suffix in TEXT_SUFFIXES and infer_name_and_split(p)[1] == "train"
        }
    )
    if task is None:
        if len(tasks) != 1:
            found = f"several tasks {tasks}; pass task=" if tasks else "no <task>.train.(txt|csv|jsonl) file"
            raise DataError(f"cannot pick a dataset in folder {folder}: it holds {found}")
        task = tasks[0]
    if task.lower() in SENTENCE_TASKS and (folder / f"{task.lower()}.train.txt").is_file():
        return load_sentence_task(task, folder, val_fraction=options["val_fraction"], seed=options["seed"])
    train = _find_split(folder, task, ("train",))
    if train is None:
        raise DataError(f"no {task}.train.(txt|csv|jsonl) in folder {folder}; tasks there: {tasks}")
    val = _find_split(folder, task, ("dev", "val", "validation"))
    return _assemble(train[0], val, _find_split(folder, task, ("test",)), name=task, **options)


def pin_spec(spec: str) -> str:
    """``spec`` as it must be recorded to mean the same data from any folder: a local path made absolute
    (``imagefolder:PATH`` too); a registered task name, ``hf:`` or ``torchvision:`` name unchanged."""
    text = str(spec)
    if text.startswith(("hf:", "torchvision:")) or text.lower() in SENTENCE_TASKS:
        return text
    prefix, rest = ("imagefolder:", text[len("imagefolder:"):]) if text.startswith("imagefolder:") else ("", text)
    path = Path(rest).expanduser()
    return prefix + str(path.absolute()) if path.exists() else text


def load_text_dataset(
    spec: str | Path,
    test: str | Path | None = None,
    *,
    task: str | None = None,
    root: str | Path | None = None,
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    val_fraction: float = 0.1,
    seed: int = 0,
    hf_config: str | None = None,
) -> DatasetSplits[TextDataset]:
    """Load train/val/test from any supported spec.

    * ``"mr"`` etc.: a registered task, read from ``root`` (default :func:`default_data_root`). A registered
      name wins over a same-named local folder; write ``./mr`` for the folder.
    * a folder: ``<task>.train.*`` plus optional ``<task>.dev.*``/``.val.*`` and ``<task>.test.*``
      (``task=`` picks one when the folder holds several).
    * a ``.txt``/``.csv``/``.jsonl`` file: train, val carved from it; ``test`` names a separate test file.
    * ``"hf:<name>"``: a Hugging Face hub dataset (needs ``datasets`` and network access).
    """
    text = str(spec)
    options = {
        "num_classes": num_classes,
        "label_names": label_names,
        "text_column": text_column,
        "label_column": label_column,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    path = Path(text).expanduser()
    is_file = path.is_file() or (not path.is_dir() and path.suffix.lower() in TEXT_SUFFIXES)
    if test is not None and not is_file:
        raise DataError(f"test= applies to a single-file spec only, not {text!r}")
    if text.startswith("hf:"):
        return load_hf_dataset(text[3:], config=hf_config, **options)
    if isinstance(spec, str) and spec.lower() in SENTENCE_TASKS:
        return load_sentence_task(spec, root, val_fraction=val_fraction, seed=seed)
    if path.is_dir():
        return _load_folder(path, task, **options)
    if is_file:  # a missing file gets check_file's listing of its folder
        test_part = None if test is None else (Path(test).expanduser(), "test")
        return _assemble(path, None, test_part, name=infer_name_and_split(path)[0], **options)
    raise DataError(
        f"unknown dataset {text!r}: not a registered task ({', '.join(sorted(SENTENCE_TASKS))}), not an "
        f"existing file or folder, and not 'hf:<name>'. Pass a task name, a folder of <task>.train.txt "
        f"files, a .txt/.csv/.jsonl file, or hf:<name>."
    )
