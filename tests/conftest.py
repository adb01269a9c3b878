"""Shared fixtures. Every test gets its own data dir; nothing touches ./data."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Gradio must not phone home from tests, and the app must not pick up a developer's key.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.pop("COMETAPI_KEY", None)
# `import app` builds the module-level demo from the environment: keep its data out of the repo.
os.environ["FLUX_STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="flux-studio-test-")
atexit.register(shutil.rmtree, os.environ["FLUX_STUDIO_DATA_DIR"], ignore_errors=True)

from services.config import Settings  # noqa: E402
from services.dataset import DatasetStore  # noqa: E402


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", workers=2)


@pytest.fixture
def store(settings: Settings) -> DatasetStore:
    return DatasetStore(settings.datasets_dir, settings)


# --------------------------------------------------------------------------- fake CometAPI

# Looks like a real key on purpose, so tests that check it never leaks are meaningful.
FAKE_COMETAPI_KEY = "sk-fake-0123456789abcdefFAKEKEY"


@pytest.fixture(scope="session")
def _fake_cometapi_server():
    from tests.fake_cometapi import FakeCometAPI

    with FakeCometAPI(api_key=FAKE_COMETAPI_KEY) as fake:
        yield fake


@pytest.fixture
def fake_cometapi(_fake_cometapi_server):
    """A fake CometAPI over real loopback HTTP (``.url``; accepts ``FAKE_COMETAPI_KEY``).

    One server runs per session; it is reset (jobs, records, faults, knobs) around each test.
    """
    _fake_cometapi_server.reset()
    yield _fake_cometapi_server
    _fake_cometapi_server.reset()
