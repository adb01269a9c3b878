"""The Space deploy command, with huggingface_hub's HfApi mocked at the method level."""
from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tools import deploy as dp
from services.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path) -> Path:
    for name in ("README.md", "requirements.txt", "space.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _front(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_readme_front_matter_follows_space_yaml(project):
    config = dp.SpaceConfig.load(project / "space.yaml")
    dp.sync_readme(project / "README.md", config, dp.pinned_gradio_version(project / "requirements.txt"))
    front = _front(project / "README.md")
    assert front["sdk"] == "gradio"
    assert front["sdk_version"] == dp.pinned_gradio_version(ROOT / "requirements.txt")
    assert front["app_file"] == "app.py" and front["hf_oauth"] is True
    assert front["python_version"] == "3.11" and "python_version: '3.11'" in (project / "README.md").read_text()
    assert front["short_description"] == config.short_description and front["license"] == config.license
    # Idempotent, and the body is kept.
    assert not dp.sync_readme(project / "README.md", config, front["sdk_version"])
    assert "make test" in (project / "README.md").read_text()


def test_committed_readme_is_in_sync():
    config = dp.SpaceConfig.load(ROOT / "space.yaml")
    front = _front(ROOT / "README.md")
    assert front == dp.front_matter(config, dp.pinned_gradio_version(ROOT / "requirements.txt"))


def test_deploy_calls_the_hub(project):
    (project / "space.yaml").write_text((project / "space.yaml").read_text().replace('bucket: ""', 'bucket: me/studio-data'))
    config = dp.SpaceConfig.load(project / "space.yaml")
    api = mock.Mock()
    url = dp.deploy(config, token="hf_secret_token", root=project, api=api, env={"COMETAPI_KEY": "sk-live-123"})
    assert url.endswith(config.space_id)
    api.create_repo.assert_called_once_with(config.space_id, repo_type="space", space_sdk="gradio", private=True,
                                            exist_ok=True)
    api.add_space_secret.assert_called_once_with(config.space_id, "COMETAPI_KEY", "sk-live-123")
    variables = {c.args[1]: c.args[2] for c in api.add_space_variable.call_args_list}
    assert variables["FLUX_STUDIO_HOSTED"] == "true" and variables["FLUX_STUDIO_DATA_DIR"] == "/data"
    assert variables["FLUX_STUDIO_DB_DIR"] == "/tmp/flux-studio-db"  # the database off the bucket mount
    [volumes_call] = api.set_space_volumes.call_args_list
    assert volumes_call.args[1][0].source == "me/studio-data"
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_type"] == "space" and ".venv/*" in upload["ignore_patterns"] and "data/*" in upload["ignore_patterns"]
    api.request_space_hardware.assert_called_once_with(config.space_id, "cpu-basic", sleep_time=3600)
    for path in project.rglob("*"):
        assert b"hf_secret_token" not in path.read_bytes() and b"sk-live-123" not in path.read_bytes()


def test_missing_secret_is_skipped_not_blanked(project):
    api = mock.Mock()
    dp.deploy(dp.SpaceConfig.load(project / "space.yaml"), token="t", root=project, api=api, env={})
    api.add_space_secret.assert_not_called()


def test_bad_configs(project, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space_id: nope\n")
    with pytest.raises(ConfigError, match="owner/name"):
        dp.SpaceConfig.load(bad)
    bad.write_text("space_id: a/b\nshort_description: " + "x" * 61 + "\n")
    with pytest.raises(ConfigError, match="60"):
        dp.SpaceConfig.load(bad)
    with pytest.raises(ConfigError, match="HF_TOKEN"):
        dp.deploy(dp.SpaceConfig.load(project / "space.yaml"), token="", root=project, api=mock.Mock())
