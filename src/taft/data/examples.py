"""Core containers for labelled examples: :class:`TextExample`, :class:`TextDataset`, :class:`DatasetSplits`.

Every example carries a *stable id* derived from its content (not its position), so that a result, a shard
assignment or a cached tangent feature can be traced back to the same sentence after the file is reordered,
extended or deduplicated elsewhere. Ids look like ``train:3f2a9c01b7de`` (split name, then the first 12 hex
characters of ``sha1(f"{label}\\t{text}")``); the k-th repeat of the same (label, text) in one split gets a
``~k`` suffix, so duplicated lines stay distinct without depending on where other lines sit.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Generic, Protocol, Self, TypeVar

import torch

from taft.errors import TaftError

ID_HEX_CHARS = 12


class DataError(TaftError):
    """A dataset could not be read or assembled; the message says what to fix (path, line, label, column).

    A :class:`~taft.errors.TaftError` (hence a ``ValueError``), so the CLI prints it as a one-line message."""


def example_id(text: str, label: int, seen: dict[tuple[int, str], int], *, split: str | None = None) -> str:
    """Content id of one example, ``[split:]<12 hex>[~k]``.

    ``seen`` counts the (label, text) pairs already given an id in this split and is updated in place; the
    k-th repeat (k >= 1) gets the suffix ``~k``. Hashing the label too keeps a sentence that appears with two
    labels (annotation noise) as two distinct examples.
    """
    key = (label, text)
    digest = hashlib.sha1(f"{label}\t{text}".encode()).hexdigest()[:ID_HEX_CHARS]
    repeat = seen.get(key, 0)
    seen[key] = repeat + 1
    base = digest if repeat == 0 else f"{digest}~{repeat}"
    return f"{split}:{base}" if split else base


def resolve_selection(
    selection: Sequence[str] | Sequence[int] | torch.Tensor, ids: Sequence[str]
) -> list[int]:
    """Turn a list of example ids *or* of integer positions into positions into ``ids``.

    Shared by every dataset's ``subset`` so that text and image datasets accept the same selections. A
    selection must not repeat an example: a subset with a repeated id would break id uniqueness downstream.
    """
    items = selection.tolist() if isinstance(selection, torch.Tensor) else list(selection)
    if all(isinstance(x, str) for x in items):
        index = {id_: i for i, id_ in enumerate(ids)}
        unknown = [x for x in items if x not in index]
        if unknown:
            raise DataError(
                f"unknown example id(s) {unknown[:5]} ({len(unknown)} in all) in a subset selection"
            )
        positions = [index[x] for x in items]
    else:
        try:
            positions = [operator.index(x) for x in items]
        except TypeError as e:
            raise DataError("a subset selection must be all ids (str) or all integer positions") from e
        bad = [p for p in positions if not 0 <= p < len(ids)]
        if bad:
            raise DataError(f"subset position(s) {bad[:5]} out of range for a dataset of {len(ids)} examples")
    if len(set(positions)) != len(positions):
        raise DataError("a subset selection repeats an example; ids must stay unique within a dataset")
    return positions


@dataclass(frozen=True)
class TextExample:
    """One labelled sentence. ``id`` is the stable content id (see :func:`example_id`)."""

    id: str
    text: str
    label: int


@dataclass
class TextDataset:
    """An ordered list of :class:`TextExample` with the label space it lives in.

    ``num_classes`` is carried explicitly (not inferred from the labels present) because a small shard or a
    validation split may miss a class while the classifier head must still have all of them.
    """

    name: str
    examples: list[TextExample]
    num_classes: int
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise DataError(f"dataset {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(
                f"dataset {self.name!r}: {len(self.class_names)} class names {self.class_names} "
                f"for num_classes={self.num_classes}"
            )
        seen: set[str] = set()
        for ex in self.examples:
            if not 0 <= ex.label < self.num_classes:
                raise DataError(
                    f"dataset {self.name!r}: example {ex.id} has label {ex.label}, "
                    f"outside range(0, {self.num_classes})"
                )
            if ex.id in seen:
                raise DataError(f"dataset {self.name!r}: duplicate example id {ex.id}")
            seen.add(ex.id)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TextExample:
        return self.examples[index]

    def __iter__(self) -> Iterator[TextExample]:
        return iter(self.examples)

    @property
    def texts(self) -> list[str]:
        return [ex.text for ex in self.examples]

    @property
    def labels(self) -> torch.Tensor:
        """Labels as a LongTensor of shape ``(len(self),)``."""
        return torch.tensor([ex.label for ex in self.examples], dtype=torch.long)

    @property
    def ids(self) -> list[str]:
        return [ex.id for ex in self.examples]

    def subset(self, ids_or_indices: Sequence[str] | Sequence[int] | torch.Tensor) -> TextDataset:
        """The examples picked by id or by position, in the order given; label space is kept."""
        positions = resolve_selection(ids_or_indices, self.ids)
        chosen = [self.examples[p] for p in positions]
        return TextDataset(self.name, chosen, self.num_classes, self.class_names)


class Subsettable(Protocol):
    """What splitting and sharding need from a dataset (text or image): a size, ids and ``subset``."""

    def __len__(self) -> int: ...

    @property
    def ids(self) -> list[str]: ...

    def subset(self, ids_or_indices: Sequence[str] | Sequence[int]) -> Self: ...


D = TypeVar("D", bound=Sized)
S = TypeVar("S", bound=Subsettable)


@dataclass
class DatasetSplits(Generic[D]):
    """train / val / test of one task. Generic so image datasets use the same container as text ones."""

    train: D
    val: D
    test: D | None = None

    def sizes(self) -> dict[str, int | None]:
        return {
            "train": len(self.train),
            "val": len(self.val),
            "test": None if self.test is None else len(self.test),
        }


def split_digests(splits: DatasetSplits, extra: str = "") -> dict[str, str | None]:
    """Content hash of each split: SHA-256 of its example ids in order (ids hash label and text), and ``extra``
    (what ids alone do not identify, e.g. an image dataset's fingerprint). A run or store records it at creation
    and checks it whenever it reads the data again, so other files under the same path are refused."""

    def digest(ds) -> str | None:
        if ds is None:
            return None
        return hashlib.sha256("\n".join([extra, *ds.ids]).encode()).hexdigest()

    return {"train": digest(splits.train), "val": digest(splits.val), "test": digest(splits.test)}


def check_digests(recorded: dict[str, str | None] | None, splits: DatasetSplits, which: Sequence[str], *,
                  what: str, spec: str, extra: str = "") -> None:
    """Refuse data whose ``which`` splits differ from the digests ``what`` (a run or a store) recorded; a record
    without digests (made by an older taft) is not checked."""
    if not recorded:
        return
    now = split_digests(splits, extra)
    changed = [s for s in which if recorded.get(s) is not None and recorded.get(s) != now.get(s)]
    if changed:
        raise DataError(f"the data {spec!r} is not the data {what} was made with: its {'/'.join(changed)} split "
                        f"differs (content hash of its examples); restore the original files at that path, or "
                        f"train again on this data")


def carve_validation(dataset: S, val_fraction: float, seed: int) -> tuple[S, S]:
    """Split ``dataset`` into (train, val) with a seeded ``torch.Generator`` permutation.

    The same seed always gives the same split (ids, not just sizes); both parts keep the original order,
    so the split is a pure function of (file, val_fraction, seed). ``round(n * val_fraction)`` examples go to
    val, clipped to [1, n - 1] so neither side is empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(dataset)
    if n < 2:
        raise DataError(f"cannot carve a validation split out of {n} example(s); need at least 2")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return dataset.subset(sorted(perm[n_val:])), dataset.subset(sorted(perm[:n_val]))


RARE_LABEL_MIN_ROWS = 100  # from this many training examples on, a label seen once is taken for a typo


def check_label_space(splits: DatasetSplits) -> None:
    """Refuse label spaces a classifier cannot learn, or that are almost surely mistakes: fewer than 2
    classes, a class without training examples (a gap in integer labels, a ``num_classes`` the data does
    not have), a val/test label never seen in training, and, among many examples, a label that occurs once
    (a typo that became a class of its own). Checked on whole splits, before any ``max_train`` cut."""
    train = splits.train
    names = getattr(train, "class_names", None)

    def name(label: int) -> str:
        return repr(names[label]) if names and label < len(names) else str(label)

    counts: dict[int, int] = {}
    for label in train.labels.tolist():
        counts[label] = counts.get(label, 0) + 1
    if len(counts) < 2:
        raise DataError(f"the training data has examples of {len(counts)} class(es) "
                        f"({', '.join(name(c) for c in counts) or 'none'}); a classifier needs at least 2")
    for split in ("val", "test"):
        ds = getattr(splits, split)
        unseen = sorted(set(ds.labels.tolist()) - set(counts)) if ds is not None else []
        if unseen:
            raise DataError(f"the {split} data has label(s) {', '.join(name(c) for c in unseen)} that never occur in "
                            f"the training data: fix the label (a typo?), or add training examples of that class")
    missing = [c for c in range(train.num_classes) if c not in counts]
    if missing:
        raise DataError(f"class(es) {', '.join(name(c) for c in missing)} of the {train.num_classes} in the label "
                        f"space have no training examples (present: {', '.join(name(c) for c in sorted(counts))}); "
                        f"labels are 0-based, and a declared --num-classes must match the data")
    once = [c for c, n in counts.items() if n == 1]
    if once and len(train) >= RARE_LABEL_MIN_ROWS:
        raise DataError(f"label {name(once[0])} occurs in only 1 of {len(train)} training examples: probably a typo; "
                        f"fix it, or give that class more examples")
