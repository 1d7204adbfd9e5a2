"""Fixtures of the shard tests: the small task's files and a trained 3-shard store copied per test."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from taft.shards import train_store

from .helpers import LINES, K, _cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    (d / "d.txt").write_text("\n".join(LINES) + "\n")
    (d / "t.txt").write_text("\n".join(LINES[:24]) + "\n")
    return d / "d.txt", d / "t.txt"


@pytest.fixture(scope="module")
def built(data, tmp_path_factory) -> Path:
    """A trained 3-shard store, copied by each test that changes it."""
    root = tmp_path_factory.mktemp("stores") / "base"
    train_store(_cfg(data), root, K, progress=False)
    return root


@pytest.fixture()
def store(built, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(built, dst)
    return dst
