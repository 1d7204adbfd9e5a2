"""Readers: every promised error (asserting on message content) and CSV/JSONL round trips."""

from __future__ import annotations

import csv
import json

import pytest

from taft.data import DataError, read_csv, read_jsonl, read_label_sentence_file, read_text_file


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_label_sentence_basic(tmp_path):
    path = _write(tmp_path / "toy.dev.txt", "\n1 good  film \n\n0 bad\r\n   \n2 meh , ok\n")
    ds = read_label_sentence_file(path)
    assert ds.name == "toy"
    assert ds.num_classes == 3  # inferred as max(label) + 1
    assert ds.texts == ["good  film", "bad", "meh , ok"]
    assert ds.labels.tolist() == [1, 0, 2]
    assert all(i.startswith("dev:") for i in ds.ids)
    named = read_label_sentence_file(path, name="x", split="val", class_names=["a", "b", "c"])
    assert (named.name, named.class_names, named.ids[0][:4]) == ("x", ["a", "b", "c"], "val:")


def test_utf8_bom_and_non_ascii(tmp_path):
    path = tmp_path / "t.train.txt"
    path.write_bytes("\ufeff1 café crème\n0 naïve\n".encode())
    ds = read_label_sentence_file(path)
    assert ds.texts == ["café crème", "naïve"]
    assert ds[0].label == 1


def test_missing_file_lists_folder(tmp_path):
    _write(tmp_path / "a.train.txt", "1 x\n")
    _write(tmp_path / "a.test.txt", "1 x\n")
    with pytest.raises(DataError) as err:
        read_label_sentence_file(tmp_path / "a.dev.txt")
    msg = str(err.value)
    assert "not found" in msg
    assert str(tmp_path / "a.dev.txt") in msg
    assert "a.test.txt, a.train.txt" in msg
    with pytest.raises(DataError, match="does not exist either"):
        read_label_sentence_file(tmp_path / "nope" / "a.txt")
    with pytest.raises(DataError, match="is a folder"):
        read_label_sentence_file(tmp_path)


def test_empty_file(tmp_path):
    for content in ("", "\n  \n\n"):
        path = _write(tmp_path / "e.train.txt", content)
        with pytest.raises(DataError, match=r"no examples in .*e\.train\.txt.*empty"):
            read_label_sentence_file(path)


@pytest.mark.parametrize(
    "bad, lineno",
    [("pos a great film", 3), ("1", 3), ("1.0 a film", 3), ("1\ta film\n0", 4)],
)
def test_bad_line_reports_line_and_form(tmp_path, bad, lineno):
    path = _write(tmp_path / "b.train.txt", f"1 fine\n\n{bad}\n0 also fine\n")
    with pytest.raises(DataError) as err:
        read_label_sentence_file(path)
    msg = str(err.value)
    assert f"line {lineno}" in msg
    assert "LABEL<space>sentence" in msg
    assert "integer LABEL" in msg
    shown = bad.split("\n")[-1] if lineno == 4 else bad
    assert repr(shown) in msg


def test_tab_separator_is_accepted(tmp_path):
    ds = read_label_sentence_file(_write(tmp_path / "t.train.txt", "1\ta film\n"))
    assert (ds[0].label, ds[0].text) == (1, "a film")


def test_label_out_of_range(tmp_path):
    path = _write(tmp_path / "r.train.txt", "0 a\n1 b\n\n5 c\n")
    with pytest.raises(DataError) as err:
        read_label_sentence_file(path, num_classes=2, class_names=["neg", "pos"])
    msg = str(err.value)
    assert "label 5" in msg
    assert "line 4" in msg
    assert "range(0, 2)" in msg
    assert "['neg', 'pos']" in msg
    with pytest.raises(DataError, match=r"label -1 .*range\(0, 2\)"):
        read_label_sentence_file(_write(tmp_path / "n.train.txt", "1 a\n-1 b\n"))


def test_strict_encoding(tmp_path):
    path = tmp_path / "x.train.txt"
    path.write_bytes(b"1 ok\n0 sister\xf0city\n")
    with pytest.raises(DataError, match="line 2 is not valid UTF-8"):
        read_label_sentence_file(path, encoding_errors="strict")
    with pytest.warns(UnicodeWarning, match=r"lines \[2\]"):
        assert read_label_sentence_file(path)[1].text == "sister\ufffdcity"


ROWS = [
    {"text": "a gripping film", "label": "pos", "extra": 1},
    {"text": 'dull, "long"', "label": "neg", "extra": 2},
    {"text": "line\nbreak", "label": "pos", "extra": 3},
]


def _csv(path, rows, fields=("text", "label", "extra")):
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("reader, writer", [(read_csv, _csv), (read_jsonl, _jsonl)])
def test_round_trip_string_labels(tmp_path, reader, writer):
    ds = reader(writer(tmp_path / f"reviews.{reader.__name__[5:]}", ROWS))
    assert ds.name == "reviews"
    assert ds.texts == ["a gripping film", 'dull, "long"', "line\nbreak"]
    assert ds.class_names == ["neg", "pos"]  # sorted unique names
    assert ds.labels.tolist() == [1, 0, 1]
    named = reader(writer(tmp_path / f"r2.{reader.__name__[5:]}", ROWS), label_names=["pos", "neg", "meh"])
    assert named.labels.tolist() == [0, 1, 0]
    assert (named.num_classes, named.class_names) == (3, ["pos", "neg", "meh"])
    with pytest.raises(DataError) as err:
        reader(writer(tmp_path / f"r3.{reader.__name__[5:]}", ROWS), label_names=["pos", "neutral"])
    assert "unknown label 'neg'" in str(err.value)
    assert "['pos', 'neutral']" in str(err.value)


@pytest.mark.parametrize("reader, writer", [(read_csv, _csv), (read_jsonl, _jsonl)])
def test_round_trip_int_labels_and_ids_match_txt(tmp_path, reader, writer):
    rows = [{"sentence": "a film", "y": 1}, {"sentence": "another", "y": 0}, {"sentence": "a film", "y": 1}]
    extra = {"fields": ("sentence", "y")} if reader is read_csv else {}
    path = writer(tmp_path / f"d.train.{reader.__name__[5:]}", rows, **extra)
    ds = reader(path, text_column="sentence", label_column="y")
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.class_names is None
    txt = read_label_sentence_file(_write(tmp_path / "d.train.txt", "1 a film\n0 another\n1 a film\n"))
    assert ds.ids == txt.ids  # same content, same ids, whatever the format


@pytest.mark.parametrize("reader, writer", [(read_csv, _csv), (read_jsonl, _jsonl)])
def test_missing_column_names_available(tmp_path, reader, writer):
    path = writer(tmp_path / f"m.{reader.__name__[5:]}", ROWS)
    with pytest.raises(DataError) as err:
        reader(path, text_column="sentence")
    msg = str(err.value)
    assert "missing column(s) ['sentence']" in msg
    assert "['text', 'label', 'extra']" in msg


def test_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match=r"invalid JSON on line 2"):
        read_jsonl(_write(tmp_path / "a.jsonl", '{"text": "x", "label": 0}\n{"text": \n'))
    with pytest.raises(DataError, match=r"line 1 is not a JSON object"):
        read_jsonl(_write(tmp_path / "b.jsonl", "[1, 2]\n"))
    with pytest.raises(DataError, match=r"text must be a non-empty string"):
        read_jsonl(_write(tmp_path / "c.jsonl", '{"text": "", "label": 0}\n'))
    with pytest.raises(DataError, match=r"no examples"):
        read_jsonl(_write(tmp_path / "d.jsonl", "\n\n"))


def test_csv_header_only_is_empty(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        read_csv(_write(tmp_path / "h.csv", "text,label\n"))


def test_read_text_file_dispatch(tmp_path):
    assert len(read_text_file(_write(tmp_path / "a.txt", "1 x\n"))) == 1
    assert len(read_text_file(_jsonl(tmp_path / "a.jsonl", ROWS))) == 3
    with pytest.raises(DataError, match=r"expected one of \.txt, \.csv, \.jsonl"):
        read_text_file(_write(tmp_path / "a.parquet", ""))
