"""Readers for labelled-text files: ``LABEL sentence`` lines, CSV and JSONL.

Each reader returns a :class:`~taft.data.examples.TextDataset` with stable content ids and fails with a
:class:`~taft.data.examples.DataError` that names the file, the line and what was expected, because a bad
line found mid-training costs far more than one found at load time.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taft.data.examples import DataError, TextDataset, TextExample, example_id

_INT = re.compile(r"[+-]?[0-9]+")
TEXT_SUFFIXES = (".txt", ".csv", ".jsonl")
# (where, text, raw label): "where" is "line 12" / "row 3", used in error messages.
Record = tuple[str, Any, Any]


class LabelWarning(UserWarning):
    """A label of the training data that looks like a mistake (it occurs once, or it is a near-copy or a different
    kind of the other labels): not an error, since a real data set may have a rare class, but named with its line."""


# Characters that show nothing: whitespace, format characters (zero-width space and joiners, BOM, bidi marks, tags),
# separators and controls, and a few letters and symbols that render blank (Hangul fillers, braille blank, the
# combining grapheme joiner, variation selectors).
_BLANK_CATEGORIES = frozenset({"Cf", "Zs", "Zl", "Zp", "Cc"})
_BLANK_CHARS = frozenset("\u034f\u115f\u1160\u3164\uffa0\u2800" + "".join(map(chr, range(0xFE00, 0xFE10))))


def _blank_char(c: str) -> bool:
    return c.isspace() or c in _BLANK_CHARS or unicodedata.category(c) in _BLANK_CATEGORIES


def is_blank_text(text: str) -> bool:
    """Whether ``text`` shows nothing: empty once whitespace and invisible characters (Unicode categories Cf, Zs,
    Zl, Zp, Cc, and a few blank-rendering letters) are removed. Such a "sentence" is no example."""
    return all(_blank_char(c) for c in text)


def _name_chars(text: str, k: int = 3) -> str:
    """The distinct invisible characters of ``text``, as ``U+200B ZERO WIDTH SPACE`` (at most ``k``)."""
    seen = list(dict.fromkeys(c for c in text if c not in " \t"))
    names = [f"U+{ord(c):04X} {unicodedata.name(c, unicodedata.category(c))}" for c in seen[:k]]
    return ", ".join(names) + (", ..." if len(seen) > k else "") if names else "spaces"


def infer_name_and_split(path: Path) -> tuple[str, str]:
    """``mr.train.txt`` -> ("mr", "train"); ``reviews.csv`` -> ("reviews", "data")."""
    parts = path.name.split(".")
    if len(parts) >= 3:
        return parts[0], parts[-2]
    return path.stem, "data"


def _clip(s: str, n: int = 120) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def check_file(path: str | Path) -> Path:
    """``path`` as a Path if it is a readable file; otherwise an error listing what the folder does hold."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise DataError(f"expected a data file but {path} is a folder")
    parent = path.parent
    if not parent.is_dir():
        raise DataError(f"data file not found: {path} (the folder {parent} does not exist either)")
    names = sorted(p.name for p in parent.iterdir() if p.is_file())
    listing = ", ".join(names[:30]) + (f", ... ({len(names)} files)" if len(names) > 30 else "")
    raise DataError(f"data file not found: {path}. Files in {parent}: {listing or '(none)'}")


def read_utf8(path: Path) -> str:
    """The text of ``path`` as UTF-8 (a leading byte-order mark is dropped); bad bytes name their line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 ({e.reason} at byte {e.start}); save the file as "
                        f"UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from e


def records_to_dataset(
    records: Sequence[tuple[str, str, int]],
    *,
    source: str | Path,
    name: str,
    split: str | None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> TextDataset:
    """Validate labels against the declared classes and assign ids; ``records`` are (where, text, label)."""
    if not records:
        raise DataError(f"no examples in {source}: it is empty or holds only blank lines")
    if num_classes is None and split == "train":  # inferred classes: a typo in one label is a class of its own
        warn_suspicious_labels(records, source=source, class_names=class_names)
    if num_classes is None:
        num_classes = len(class_names) if class_names else max(label for _, _, label in records) + 1
    shown = f" {list(class_names)}" if class_names else ""
    seen: dict[tuple[int, str], int] = {}
    examples = []
    for where, text, label in records:
        if not 0 <= label < num_classes:
            raise DataError(
                f"{source}, {where}: label {label} is outside the declared classes "
                f"range(0, {num_classes}){shown}"
            )
        examples.append(TextExample(example_id(text, label, seen, split=split), text, label))
    return TextDataset(name, examples, num_classes, list(class_names) if class_names else None)


RARE_RATIO = 5  # a label this many times rarer than a look-alike (or than the labels of the other kind) is suspect


def _looks_alike(a: str, b: str) -> bool:
    """``a`` differs from ``b`` only by case, spacing or punctuation, or by a typo (similarity ≥ 0.8)."""
    def norm(x: str) -> str:
        return "".join(c for c in x.casefold() if c.isalnum())

    return a != b and (norm(a) == norm(b) or difflib.SequenceMatcher(None, a.casefold(), b.casefold()).ratio() >= 0.8)


def warn_suspicious_labels(records: Sequence[tuple[str, str, int]], *, source: str | Path,
                           class_names: Sequence[str] | None = None) -> None:
    """One :class:`LabelWarning` per training label that is probably a mistake, naming the file, its line(s) and
    the fix: a label with a single example; a string label that is a near-copy of a label at least
    :data:`RARE_RATIO` times more frequent (``Pos``/``pos``, ``postive``/``positive``); a number among words or a
    word among numbers. ``records`` are (where, text, label) with labels mapped to ``class_names``' positions.

    Warnings, not errors: a real data set may have a rare class. Declaring the classes (``num_classes``) turns a
    label outside them into an error naming its line; :func:`records_to_dataset` checks only without it."""
    rows: dict[int, list[str]] = {}
    for where, _, label in records:
        rows.setdefault(label, []).append(where)
    if len(rows) < 2:
        return  # one class: an error later (check_label_space)
    counts = {label: len(w) for label, w in rows.items()}
    reasons: dict[int, list[str]] = {}
    names = list(class_names) if class_names else None

    def shown(label: int) -> str:
        return repr(names[label]) if names and 0 <= label < len(names) else str(label)

    if names and all(0 <= label < len(names) for label in rows):
        for label in sorted(rows):
            alike = [m for m in rows if counts[m] >= RARE_RATIO * counts[label] and _looks_alike(names[label],
                                                                                                names[m])]
            if alike:
                best = max(alike, key=lambda m: counts[m])
                reasons.setdefault(label, []).append(f"looks like {shown(best)} ({counts[best]} rows)")
        numeric = {label: bool(_INT.fullmatch(names[label].strip())) for label in rows}
        by_kind = {kind: sum(counts[label] for label in rows if numeric[label] == kind) for kind in (True, False)}
        for label in sorted(rows):
            kind = numeric[label]
            if by_kind[kind] * RARE_RATIO <= by_kind[not kind]:
                what, others = ("a number", "words") if kind else ("a word", "numbers")
                reasons.setdefault(label, []).append(f"is {what} while the other labels are {others}")
    for label in sorted(rows):
        if counts[label] == 1:
            reasons.setdefault(label, []).insert(0, "occurs only once")
    for label, why in sorted(reasons.items()):
        where = rows[label]
        lines = ", ".join(where[:5]) + (f" (and {len(where) - 5} more)" if len(where) > 5 else "")
        warnings.warn(
            f"{source}, {lines}: training label {shown(label)} ({counts[label]} of {len(records)} rows) "
            f"{' and '.join(why)}, so it becomes a class of its own: if it is a typo, fix that line; if not, declare "
            f"the classes with --num-classes (num_classes=), which makes a label outside them an error",
            LabelWarning,
            stacklevel=3,
        )


def read_label_sentence_file(
    path: str | Path,
    *,
    num_classes: int | None = None,
    name: str | None = None,
    split: str | None = None,
    class_names: Sequence[str] | None = None,
    encoding_errors: str = "replace",
) -> TextDataset:
    """Read ``LABEL<space>sentence`` lines (UTF-8, blank lines skipped).

    ``name`` and ``split`` default to the parts of ``<name>.<split>.txt``; ``num_classes`` defaults to
    ``len(class_names)`` or ``max(label) + 1``. Lines that are not valid UTF-8 are decoded with
    ``encoding_errors`` (default ``"replace"``, with a warning naming the lines; ``"strict"`` raises): the
    real ``trec.train.txt`` has one stray byte, and dropping a whole benchmark over it helps nobody.
    """
    path = check_file(path)
    default_name, default_split = infer_name_and_split(path)
    records: list[tuple[str, str, int]] = []
    undecodable: list[int] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if encoding_errors == "strict":
                    msg = f"{path}: line {lineno} is not valid UTF-8 ({e.reason}): {raw[:120]!r}"
                    raise DataError(msg) from e
                line = raw.decode("utf-8", errors=encoding_errors)
                undecodable.append(lineno)
            line = line.removeprefix("\ufeff").strip() if lineno == 1 else line.strip()
            if not line:
                continue
            if is_blank_text(line):
                raise DataError(f"{path}: line {lineno} holds only invisible characters ({_name_chars(line)}); "
                                f"delete the line or write `LABEL sentence` on it")
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not _INT.fullmatch(parts[0]):
                raise DataError(
                    f"{path}: cannot parse line {lineno}: {_clip(line)!r}; "
                    f"expected `LABEL<space>sentence` with an integer LABEL, e.g. `1 a gripping , funny film`"
                )
            if is_blank_text(parts[1]):
                raise DataError(f"{path}: line {lineno}: the sentence after label {parts[0]} is empty: it holds only "
                                f"invisible characters ({_name_chars(parts[1])}); write the sentence or delete the "
                                f"line")
            records.append((f"line {lineno}", parts[1], int(parts[0])))
    if undecodable:
        warnings.warn(
            f"{path}: {len(undecodable)} line(s) not valid UTF-8 (lines {undecodable[:5]}); invalid bytes "
            f"decoded with errors={encoding_errors!r}",
            UnicodeWarning,
            stacklevel=2,
        )
    return records_to_dataset(
        records,
        source=path,
        name=name or default_name,
        split=split or default_split,
        num_classes=num_classes,
        class_names=class_names,
    )


def _int_like(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    if isinstance(v, float):
        return v.is_integer()
    return isinstance(v, str) and _INT.fullmatch(v.strip()) is not None


def map_labels(
    records: Sequence[Record], *, source: str | Path, label_names: Sequence[str] | None
) -> tuple[list[tuple[str, str, int]], list[str] | None]:
    """Turn raw (where, text, label) records into integer labels; returns (records, class names or None).

    Integer labels (or integer strings, as every CSV value is a string) are used as is. String labels are
    looked up in ``label_names``; without ``label_names`` the sorted unique strings become the classes, so
    the mapping does not depend on row order.
    """
    out: list[tuple[str, str, int]] = []
    for where, text, _ in records:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{source}, {where}: text must be a non-empty string, got {text!r}")
        if is_blank_text(text):
            raise DataError(f"{source}, {where}: the text is empty: it holds only invisible characters "
                            f"({_name_chars(text)}); write the sentence or delete the row")
    raws = [raw for _, _, raw in records]
    if label_names is not None:
        index = {n: i for i, n in enumerate(label_names)}
        names: list[str] | None = list(label_names)
    elif all(_int_like(r) for r in raws):
        index, names = {}, None
    else:
        missing = [where for where, _, raw in records if raw is None or (isinstance(raw, str) and is_blank_text(raw))]
        if missing:
            raise DataError(f"{source}, {missing[0]}: missing label")
        names = sorted({str(r).strip() for r in raws})
        index = {n: i for i, n in enumerate(names)}
    for where, text, raw in records:
        key = raw.strip() if isinstance(raw, str) else raw
        if isinstance(key, str) and key in index:
            label = index[key]
        elif label_names is None and names is not None:
            label = index[str(key)]
        elif _int_like(raw):
            label = int(float(raw)) if isinstance(raw, float) else int(raw)
        else:
            raise DataError(f"{source}, {where}: unknown label {raw!r}; known label names: {names}")
        out.append((where, text.strip(), label))
    return out, names


def _require_columns(source: Path, available: Sequence[str], *columns: str, where: str = "") -> None:
    missing = [c for c in columns if c not in available]
    if missing:
        raise DataError(
            f"{source}{where}: missing column(s) {missing}; available columns: {list(available)}. "
            f"Pass text_column=/label_column= to pick others."
        )


def _column_records_to_dataset(
    records: Sequence[Record],
    *,
    source: Path,
    label_names: Sequence[str] | None,
    num_classes: int | None,
    name: str | None,
    split: str | None,
) -> TextDataset:
    """Raw (where, text, label) rows of a CSV/JSONL file -> dataset: labels mapped (:func:`map_labels`), then
    validated and given ids (:func:`records_to_dataset`); ``name``/``split`` default to the file name's parts."""
    default_name, default_split = infer_name_and_split(source)
    mapped, names = map_labels(records, source=source, label_names=label_names)
    return records_to_dataset(
        mapped,
        source=source,
        name=name or default_name,
        split=split or default_split,
        num_classes=num_classes,
        class_names=names,
    )


def read_csv(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    split: str | None = None,
) -> TextDataset:
    """Read a CSV file with a header row; labels are integers or names (see :func:`map_labels`)."""
    path = check_file(path)
    records: list[Record] = []
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    try:
        _require_columns(path, reader.fieldnames or [], text_column, label_column)
        for row in reader:
            records.append((f"line {reader.line_num}", row[text_column], row[label_column]))
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from e
    return _column_records_to_dataset(
        records, source=path, label_names=label_names, num_classes=num_classes, name=name, split=split
    )


def read_jsonl(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    split: str | None = None,
) -> TextDataset:
    """Read one JSON object per line (blank lines skipped); same label rules as :func:`read_csv`."""
    path = check_file(path)
    records: list[Record] = []
    for lineno, raw in enumerate(read_utf8(path).split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            shown = _clip(raw.strip())
            raise DataError(f"{path}: invalid JSON on line {lineno} ({e.msg}): {shown!r}") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object: {_clip(raw.strip())!r}")
        _require_columns(path, list(obj), text_column, label_column, where=f", line {lineno}")
        records.append((f"line {lineno}", obj[text_column], obj[label_column]))
    return _column_records_to_dataset(
        records, source=path, label_names=label_names, num_classes=num_classes, name=name, split=split
    )


def read_text_file(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    num_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    name: str | None = None,
    split: str | None = None,
) -> TextDataset:
    """Dispatch on the suffix: ``.txt`` (``LABEL sentence``), ``.csv`` or ``.jsonl``."""
    suffix = Path(path).suffix.lower()
    common: dict[str, Any] = {"num_classes": num_classes, "name": name, "split": split}
    if suffix == ".txt":
        return read_label_sentence_file(path, class_names=label_names, **common)
    columns = {"text_column": text_column, "label_column": label_column, "label_names": label_names}
    if suffix == ".csv":
        return read_csv(path, **columns, **common)
    if suffix == ".jsonl":
        return read_jsonl(path, **columns, **common)
    raise DataError(f"unsupported data file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
