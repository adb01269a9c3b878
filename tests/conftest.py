"""Shared fixtures. Every test gets its own data dir; nothing touches ./data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Gradio must not phone home from tests, and the app must not pick up a developer's key.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.pop("COMETAPI_KEY", None)

from services.config import Settings  # noqa: E402
from services.dataset import DatasetStore  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", workers=2)


@pytest.fixture
def store(settings: Settings) -> DatasetStore:
    return DatasetStore(settings.datasets_dir, settings)
