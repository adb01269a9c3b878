"""Deploy the app to a Hugging Face Space: ``python -m tools.deploy`` (or ``make deploy``).

``space.yaml`` is the single source of truth. Hugging Face reads a Space's settings only from
README.md's front matter, so this module rewrites that front matter from space.yaml (with
``sdk_version`` equal to the gradio pinned in requirements.txt) before uploading.
The token comes from ``HF_TOKEN`` and is passed to ``HfApi`` only; it is never written anywhere.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.errors import ConfigError, InputError
from services.engine.hub import validate_repo_id

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("flux_studio.deploy")


@dataclass(frozen=True)
class SpaceConfig:
    space_id: str
    title: str
    short_description: str = ""
    emoji: str = "🎨"
    color_from: str = "indigo"
    color_to: str = "pink"
    license: str = "apache-2.0"
    python_version: str = "3.11"
    app_file: str = "app.py"
    private: bool = True
    hardware: str = "cpu-basic"
    sleep_time: int | None = None
    bucket: str = ""
    mount_path: str = "/data"
    secrets: tuple[str, ...] = ()
    variables: dict[str, str] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> "SpaceConfig":
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path} was not found.", hint="Create it from the example in the README.") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML ({exc.__class__.__name__}).") from None
        space_id = str(raw.get("space_id", "")).strip()
        try:
            validate_repo_id(space_id)
        except InputError:
            raise ConfigError(f"space_id in {path.name} must look like owner/name, got {space_id!r}.") from None
        if len(str(raw.get("short_description", ""))) > 60:
            raise ConfigError("short_description must be at most 60 characters (a Hugging Face limit).")
        storage = raw.get("storage") or {}
        return cls(
            space_id=space_id,
            title=str(raw.get("title", space_id.split("/")[1])),
            short_description=str(raw.get("short_description", "")),
            emoji=str(raw.get("emoji", "🎨")),
            color_from=str(raw.get("color_from", "indigo")),
            color_to=str(raw.get("color_to", "pink")),
            license=str(raw.get("license", "apache-2.0")),
            python_version=str(raw.get("python_version", "3.11")),
            app_file=str(raw.get("app_file", "app.py")),
            private=bool(raw.get("private", True)),
            hardware=str(raw.get("hardware", "cpu-basic")),
            sleep_time=int(raw["sleep_time"]) if raw.get("sleep_time") is not None else None,
            bucket=str(storage.get("bucket") or ""),
            mount_path=str(storage.get("mount_path") or "/data"),
            secrets=tuple(str(s) for s in raw.get("secrets") or ()),
            variables={str(k): str(v) for k, v in (raw.get("variables") or {}).items()},
            ignore=tuple(str(s) for s in raw.get("ignore") or ()),
        )


def pinned_gradio_version(requirements: Path) -> str:
    for line in requirements.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\s*gradio(\[[\w,\s]+\])?\s*==\s*([\w.]+)", line)
        if m:
            return m.group(2)
    raise ConfigError("requirements.txt must pin gradio with == so the Space runs the same version.")


LOCAL_DB_DIR = "/tmp/flux-studio-db"  # a Space's local (ephemeral) disk


HF_OAUTH_SCOPES = ("contribute-repos", "jobs", "inference-api")


def front_matter(config: SpaceConfig, gradio_version: str) -> dict[str, Any]:
    return {
        "title": config.title,
        "emoji": config.emoji,
        "colorFrom": config.color_from,
        "colorTo": config.color_to,
        "sdk": "gradio",
        "sdk_version": gradio_version,
        # Quoted on purpose: YAML would read 3.10 as the number 3.1.
        "python_version": str(config.python_version),
        "app_file": config.app_file,
        "short_description": config.short_description,
        "license": config.license,
        "pinned": False,
        # The LoginButton's "Sign in with Hugging Face": the sign-in becomes the visitor's identity.
        "hf_oauth": True,
        # What a signed-in visitor lets the app do on their own account (the Hugging Face provider):
        # create the private dataset and LoRA repos (and only touch repos this app created), run the
        # training job, and call Inference Providers for Compare. Nothing else of theirs is reachable.
        "hf_oauth_scopes": list(HF_OAUTH_SCOPES),
    }


def sync_readme(readme: Path, config: SpaceConfig, gradio_version: str) -> bool:
    """Write README.md's front matter from space.yaml (huggingface_hub's SpaceCard writes it as the Hub
    reads it); returns whether the file changed."""
    from huggingface_hub import SpaceCard, SpaceCardData

    text = readme.read_text(encoding="utf-8")
    card = SpaceCard(text, ignore_metadata_errors=True)
    card.data = SpaceCardData(**front_matter(config, gradio_version))
    new = str(card)
    if new != text:
        readme.write_text(new, encoding="utf-8")
        return True
    return False


def deploy(config: SpaceConfig, *, token: str, root: Path = ROOT, api=None, env: dict[str, str] | None = None,
           dry_run: bool = False) -> str:
    """Create or update the Space; returns its URL. ``api`` is an ``HfApi`` (tests pass a mock)."""
    env = os.environ if env is None else env
    sync_readme(root / "README.md", config, pinned_gradio_version(root / "requirements.txt"))
    if dry_run:
        return f"https://huggingface.co/spaces/{config.space_id} (dry run: README front matter synced only)"
    if not token:
        raise ConfigError("HF_TOKEN is not set.", hint="Create a write token at huggingface.co/settings/tokens.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(config.space_id, repo_type="space", space_sdk="gradio", private=config.private, exist_ok=True)
    for name in config.secrets:
        value = env.get(name, "")
        if value:
            api.add_space_secret(config.space_id, name, value)
        else:
            log.warning("Secret %s is not set in this environment; the Space keeps its current value.", name)
    variables = dict(config.variables)
    if config.bucket:
        from huggingface_hub import Volume

        api.set_space_volumes(config.space_id, [Volume(type="bucket", source=config.bucket, mount_path=config.mount_path)])
        variables["FLUX_STUDIO_DATA_DIR"] = config.mount_path
        # SQLite (WAL) is unsafe on a bucket mount: the database stays on the Space's local disk,
        # copied to the bucket every few minutes and on shutdown (services.storage.database.DatabaseBackup).
        variables.setdefault("FLUX_STUDIO_DB_DIR", LOCAL_DB_DIR)
    for name, value in variables.items():
        api.add_space_variable(config.space_id, name, value)
    api.upload_folder(repo_id=config.space_id, repo_type="space", folder_path=str(root),
                      ignore_patterns=list(config.ignore), commit_message="Deploy FLUX Finetune Studio")
    api.request_space_hardware(config.space_id, config.hardware, sleep_time=config.sleep_time)
    return f"https://huggingface.co/spaces/{config.space_id}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deploy FLUX Finetune Studio to a Hugging Face Space.")
    parser.add_argument("--config", type=Path, default=ROOT / "space.yaml")
    parser.add_argument("--dry-run", action="store_true", help="only sync README.md's front matter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        url = deploy(SpaceConfig.load(args.config), token=os.environ.get("HF_TOKEN", ""), dry_run=args.dry_run)
    except ConfigError as exc:
        sys.exit(str(exc))
    print(url)


if __name__ == "__main__":
    main()
