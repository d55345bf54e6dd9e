"""Shared fixtures. Tests open engines inside the test body (`async with Engine.open(...)`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A fresh database path in a temporary directory."""
    return tmp_path / "runs.db"
