"""Readers for labelled-text files: ``LABEL sentence`` lines, CSV and JSONL.

Each reader returns a :class:`~taft.data.examples.TextDataset` with stable content ids and fails with a
:class:`~taft.data.examples.DataError` that names the file, the line and what was expected, because a bad
line found mid-training costs far more than one found at load time.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taft.data.examples import DataError, TextDataset, TextExample, example_id

_INT = re.compile(r"[+-]?[0-9]+")
TEXT_SUFFIXES = (".txt", ".csv", ".jsonl")
# (where, text, raw label): "where" is "line 12" / "row 3", used in error messages.
Record = tuple[str, Any, Any]


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
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not _INT.fullmatch(parts[0]):
                raise DataError(
                    f"{path}: cannot parse line {lineno}: {_clip(line)!r}; "
                    f"expected `LABEL<space>sentence` with an integer LABEL, e.g. `1 a gripping , funny film`"
                )
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
    raws = [raw for _, _, raw in records]
    if label_names is not None:
        index = {n: i for i, n in enumerate(label_names)}
        names: list[str] | None = list(label_names)
    elif all(_int_like(r) for r in raws):
        index, names = {}, None
    else:
        missing = [where for where, _, raw in records if raw is None or raw == ""]
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
