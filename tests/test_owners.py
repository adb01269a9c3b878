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


def test_the_sweep_removes_owner_folders_with_no_file_and_nothing_else(settings, tmp_path):
    import os

    from services.storage.owners import sweep_empty

    owners = settings.data_dir / "owners"
    assert sweep_empty(settings) == 0  # no owners folder yet: nothing to do
    (owners / "empty" / "results").mkdir(parents=True)
    (owners / "deep" / "datasets" / "a" / "images").mkdir(parents=True)
    (owners / "used" / "datasets" / "a").mkdir(parents=True)
    (owners / "used" / "datasets" / "a" / "dataset.json").write_text("{}")
    (owners / "used" / "results").mkdir()  # an empty folder inside an owner's that has files: theirs, kept
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, owners / "link")  # never followed, never removed
    assert sweep_empty(settings) == 2
    assert sorted(p.name for p in owners.iterdir()) == ["link", "used"]
    assert (owners / "used" / "results").is_dir() and outside.is_dir()
