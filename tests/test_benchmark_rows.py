"""The resumable benchmarks' JSONL logs (``benchmarks/shards.py``: ``read_rows`` / ``append_row``): a row cut short
by a killed writer runs again, a whole row is never lost, damage is an error naming the file and line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from shards import append_row, read_rows  # noqa: E402


def test_rows_round_trip_and_a_missing_file(tmp_path):
    log = tmp_path / "sub" / "rows.jsonl"
    assert read_rows(log) == []
    for i in range(3):
        append_row(log, {"i": i})
    assert read_rows(log) == [{"i": 0}, {"i": 1}, {"i": 2}]
    log.write_text("")
    assert read_rows(log) == []


def test_a_row_cut_short_is_dropped_and_cut_off_before_the_next(tmp_path):
    log = tmp_path / "rows.jsonl"
    log.write_text('{"i": 0}\n\n{"i": 1}\n{"i": 2, "x": [1, 2')  # killed mid-row (blank lines are ignored)
    assert read_rows(log) == [{"i": 0}, {"i": 1}]
    append_row(log, {"i": 3})
    assert log.read_text() == '{"i": 0}\n\n{"i": 1}\n{"i": 3}\n'
    assert read_rows(log) == [{"i": 0}, {"i": 1}, {"i": 3}]


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    log = tmp_path / "rows.jsonl"
    log.write_text('{"i": 0}\n{"i": 1}')  # killed after the row, before its newline
    assert read_rows(log) == [{"i": 0}, {"i": 1}]
    append_row(log, {"i": 2})
    assert read_rows(log) == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.parametrize("text", ['{"i": 0}\nnot json\n{"i": 1}\n', '{"i": 0}\n{"i": 1, "x"\n'])
def test_a_damaged_line_is_an_error_naming_it_and_nothing_is_written(tmp_path, text):
    log = tmp_path / "rows.jsonl"
    log.write_text(text)
    for call in (lambda: read_rows(log), lambda: append_row(log, {"i": 9})):
        with pytest.raises(SystemExit, match=r"rows\.jsonl, line 2 is not a JSON row"):
            call()
    assert log.read_text() == text
    assert json.loads(text.splitlines()[0]) == {"i": 0}
