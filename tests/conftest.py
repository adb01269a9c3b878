"""Shared fixtures. Every test gets its own data dir; nothing touches ./data."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

# Gradio must not phone home from tests, and the app must not pick up a developer's key.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.pop("COMETAPI_KEY", None)
# Anything that reads the environment's settings (app.demo, main()) keeps its data out of the repo.
os.environ["FLUX_STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="flux-studio-test-")
atexit.register(shutil.rmtree, os.environ["FLUX_STUDIO_DATA_DIR"], ignore_errors=True)

from services.config import THREAD_PREFIX, Settings  # noqa: E402
from services.storage.datasets import DatasetStore  # noqa: E402

# A thread that has signalled it is done may still be returning; this long, at most, to let it.
THREAD_EXIT_S = 10.0


@pytest.fixture(autouse=True)
def no_thread_of_ours_left_behind():
    """Fail any test that leaves one of the app's threads alive (daemon or not): a tracker, a local
    training, a grid. One that outlives its test holds the training slot, or writes into the next
    test's data, and makes a later test slow or wrong."""
    before = set(threading.enumerate())
    yield
    ours = [t for t in threading.enumerate() if t not in before and t.name.startswith(THREAD_PREFIX)]
    for thread in ours:
        thread.join(THREAD_EXIT_S)
    alive = sorted(t.name for t in ours if t.is_alive())
    if alive:
        pytest.fail(f"The test left these threads of the app running: {', '.join(alive)}. "
                    "Close the app (demo.close()) or the provider (provider.close()) it started.")


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


# --------------------------------------------------------------------------- the trainer's command line


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """One real run of the trainer's command line (``engine.cli``, a subprocess) on the tiny FLUX.1
    model: 6 steps, a sample and a checkpoint at step 3, a sample at 6 (tests/train_cli_run.py)."""
    for extra in ("torch", "diffusers", "peft"):
        pytest.importorskip(extra)
    from tests.train_cli_run import run_cli

    run = run_cli(tmp_path_factory.mktemp("cli-run"), steps=6)
    assert run.returncode == 0, f"the trainer's command line failed:\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="session")
def cli_run_lines(cli_run) -> list[str]:
    """The stdout lines of that run, in order: what a Hugging Face job's log would hold."""
    return list(cli_run.lines)
