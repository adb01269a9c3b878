"""The owner secret: kept apart when configured, never silently replaced when lost."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.config import Secret
from services.errors import ConfigError
from services.storage.owners import SECRET_FILE, installation_secret, owner_dir

ROOT = Path(__file__).resolve().parent.parent


def test_a_lost_secret_next_to_visitors_folders_is_an_error_not_a_new_secret(settings):
    hosted = settings.with_(hosted=True)
    folder = owner_dir(hosted, "visitor-abc")
    folder.mkdir(parents=True)
    secret_file = settings.data_dir / SECRET_FILE
    secret_file.unlink()
    with pytest.raises(ConfigError, match="is missing, but visitors' folders exist"):
        owner_dir(hosted, "visitor-abc")
    assert not secret_file.exists()  # nothing was re-keyed behind the owner's back
    secret_file.write_text("not hex at all")
    with pytest.raises(ConfigError, match="is unreadable"):
        installation_secret(hosted)
    assert secret_file.read_text() == "not hex at all"


def test_the_secret_can_come_from_the_environment_instead_of_the_data_dir(settings):
    value = "ab" * 32
    hosted = settings.with_(hosted=True, owner_secret=Secret(value))
    assert installation_secret(hosted) == bytes.fromhex(value)
    assert owner_dir(hosted, "visitor-abc") != owner_dir(settings.with_(owner_secret=Secret("cd" * 32)), "visitor-abc")
    assert not (settings.data_dir / SECRET_FILE).exists()  # nothing written next to the data
    with pytest.raises(ConfigError, match="64 hex digits"):
        installation_secret(hosted.with_(owner_secret=Secret("short")))


def test_the_app_refuses_to_start_without_its_secret(settings, tmp_path):
    data = tmp_path / "data"
    (data / "owners" / "0123").mkdir(parents=True)
    env = {"FLUX_STUDIO_DATA_DIR": str(data), "FLUX_STUDIO_HOSTED": "true", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "app.py", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 1
    assert "The owner secret" in out.stderr and "Restore the file" in out.stderr
    assert "Traceback" not in out.stderr and not (data / SECRET_FILE).exists()
