"""Shared fixtures: the real sentence-task files live outside the repo, beside it in ``shared/``."""

from __future__ import annotations

from pathlib import Path

import pytest

TASKS_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sentence-tasks"


@pytest.fixture(scope="session")
def tasks_root() -> Path:
    if not (TASKS_ROOT / "mr.train.txt").is_file():
        pytest.skip(f"real sentence-task data not found at {TASKS_ROOT} (expected shared/ beside the repo)")
    return TASKS_ROOT
