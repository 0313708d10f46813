"""Shared fixtures: a fresh data directory and settings per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from featurerec.config import Settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Default settings with the data directory inside the test's tmp_path."""
    return Settings.model_validate({"data_dir": str(tmp_path / "data")})
