"""All settings, read from environment variables in one place.

Nothing else in the project reads ``os.environ`` for settings: build a ``Settings``
with ``Settings.from_env()`` (or construct one directly in tests) and pass it down.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from services.errors import ConfigError

# The app's name and version, as files it writes say who made them (a LoRA's safetensors metadata).
APP_NAME = "FLUX Finetune Studio"
APP_VERSION = "1.0"

# Every thread the app starts is named with this prefix, so that tests can tell that none outlived its work.
THREAD_PREFIX = "studio-"


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks.

    Call ``reveal()`` at the single place that must send it (an HTTP header).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = (value or "").strip()

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # pickling would write the key to disk or a pipe
        raise TypeError("Secret values cannot be pickled")

    # Immutable, so copies may share it (gr.State deep-copies values; that must not pickle).
    def __copy__(self) -> "Secret":
        return self

    def __deepcopy__(self, memo) -> "Secret":
        return self


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}.", hint="Fix or unset it.") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}.", hint="Fix or unset it.")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}.", hint="Fix or unset it.") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.", hint="Fix or unset it.")


@dataclass(frozen=True)
class Settings:
    # Where datasets, jobs, results and exports live. On a Space, point it at a mounted bucket.
    data_dir: Path = Path("data")
    # Where the SQLite database lives, when not in data_dir: SQLite (WAL) is unsafe on a bucket or
    # network mount, so on a Space it stays on local disk and is copied to data_dir every
    # db_backup_every_s seconds and on shutdown (services.storage.database.DatabaseBackup).
    db_dir: Path | None = None
    db_backup_every_s: float = 300.0

    # Dataset rules. The hosted service caps images at 1 MP and takes 1-20 images (>5 recommended).
    target_megapixels: float = 1.0
    min_images: int = 1
    recommended_min_images: int = 5
    max_images: int = 20
    min_short_side: int = 512
    # Images above this pixel count are refused before decoding (decompression bombs).
    max_image_pixels: int = 120_000_000
    max_zip_bytes: int = 500 * 1024 * 1024
    # Upper bound on what a zip may inflate to, so a zip bomb cannot fill the disk.
    max_unzipped_bytes: int = 2 * 1024 * 1024 * 1024
    # A training set is a few dozen images: more entries than this is a mistake or an attack.
    max_zip_entries: int = 1000
    max_zip_entry_bytes: int = 64 * 1024 * 1024
    # Photos barely compress (JPEG about 1:1, PNG a few to one); a zip entry far past this is a bomb.
    max_zip_ratio: int = 100
    max_upload_bytes: int = 600 * 1024 * 1024
    # Worker threads for image preparation; 0 = one per CPU core.
    workers: int = 0

    # CometAPI.
    cometapi_base_url: str = "https://api.cometapi.com"
    cometapi_key: Secret = field(default_factory=lambda: Secret(""))
    caption_model: str = "gpt-4o-mini"
    caption_concurrency: int = 4

    # Local engine.
    local_model: str = ""
    # Downloads a gated base model (FLUX.1-dev) from the Hub; empty = huggingface_hub's own login, if any.
    hf_token: Secret = field(default_factory=lambda: Secret(""))

    # Hugging Face (HF Jobs trains, Inference Providers generate). Locally it runs on HF_TOKEN (or the
    # saved `hf auth login`); hosted, only on a signed-in visitor's own token, never the Space owner's.
    hf_base_model: str = "black-forest-labs/FLUX.1-dev"  # what HF jobs train on and Inference Providers serve
    hf_inference_provider: str = "auto"  # InferenceClient(provider=...): "auto", "fal-ai", "replicate", ...
    hf_checkpoint_every: int = 100  # a job pushes a checkpoint and a sample to its model repo every N steps
    hf_job_timeout: str = "4h"  # the most a job may run (and bill) before HF stops it

    # Hosting.
    auth: str = ""  # "user:pass" for a shared password; empty = none
    mcp: bool = False  # also serve the API as MCP tools at /gradio_api/mcp/ (an assistant drives the app)
    # Hosted mode: paid calls per visitor per hour on the app's own (shared) CometAPI key.
    shared_key_limit: int = 20
    # ...per client address (a new cookie is a new visitor; an address is harder to change)...
    shared_key_address_limit: int = 60
    # ...and for everyone together: the most the owner's key can spend in an hour.
    shared_key_hourly_cap: int = 300
    # Proxies in front of the app that each append the address they were reached from to X-Forwarded-For:
    # the client's address is the entry that many places from the right (what the client wrote itself is
    # further left, and never trusted). None: 1 on a Space (Hugging Face's proxy), else 0 (the
    # connection's own address).
    trusted_proxies: int | None = None
    # Hosted: what one visitor may keep and queue on this server.
    visitor_max_datasets: int = 20
    visitor_max_bytes: int = 2 * 1024 * 1024 * 1024
    visitor_max_local_jobs: int = 2  # queued or running on the local engine at once
    hosted: bool = False
    space_id: str = ""
    # Keys the hosted owner folders' names (hex, 64 digits). Empty: kept in <data_dir>/.owner-secret.
    # On a Space, set it as a secret, so that it lives apart from the data it protects.
    owner_secret: Secret = field(default_factory=lambda: Secret(""))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()
        return cls(
            data_dir=Path(env.get("FLUX_STUDIO_DATA_DIR", "").strip() or d.data_dir),
            db_dir=Path(env["FLUX_STUDIO_DB_DIR"].strip()) if env.get("FLUX_STUDIO_DB_DIR", "").strip() else None,
            db_backup_every_s=_float(env, "FLUX_STUDIO_DB_BACKUP_EVERY_S", d.db_backup_every_s),
            target_megapixels=_float(env, "FLUX_STUDIO_TARGET_MEGAPIXELS", d.target_megapixels),
            max_images=_int(env, "FLUX_STUDIO_MAX_IMAGES", d.max_images, minimum=1),
            min_short_side=_int(env, "FLUX_STUDIO_MIN_SHORT_SIDE", d.min_short_side),
            max_image_pixels=_int(env, "FLUX_STUDIO_MAX_IMAGE_PIXELS", d.max_image_pixels, minimum=1),
            max_zip_bytes=_int(env, "FLUX_STUDIO_MAX_ZIP_MB", d.max_zip_bytes // 2**20, minimum=1) * 2**20,
            max_upload_bytes=_int(env, "FLUX_STUDIO_MAX_UPLOAD_MB", d.max_upload_bytes // 2**20, minimum=1) * 2**20,
            workers=_int(env, "FLUX_STUDIO_WORKERS", d.workers),
            cometapi_base_url=(env.get("COMETAPI_BASE_URL", "").strip() or d.cometapi_base_url).rstrip("/"),
            cometapi_key=Secret(env.get("COMETAPI_KEY")),
            caption_model=env.get("COMETAPI_CAPTION_MODEL", "").strip() or d.caption_model,
            caption_concurrency=_int(env, "COMETAPI_CAPTION_CONCURRENCY", d.caption_concurrency, minimum=1),
            local_model=env.get("FLUX_LOCAL_MODEL", "").strip(),
            hf_token=Secret(env.get("HF_TOKEN")),
            hf_base_model=env.get("FLUX_HF_BASE_MODEL", "").strip() or d.hf_base_model,
            hf_inference_provider=env.get("FLUX_HF_INFERENCE_PROVIDER", "").strip() or d.hf_inference_provider,
            hf_checkpoint_every=_int(env, "FLUX_HF_CHECKPOINT_EVERY", d.hf_checkpoint_every, minimum=1),
            hf_job_timeout=env.get("FLUX_HF_JOB_TIMEOUT", "").strip() or d.hf_job_timeout,
            auth=env.get("FLUX_STUDIO_AUTH", "").strip(),
            mcp=_bool(env, "FLUX_STUDIO_MCP", False),
            shared_key_limit=_int(env, "FLUX_STUDIO_SHARED_KEY_LIMIT", d.shared_key_limit, minimum=0),
            shared_key_address_limit=_int(env, "FLUX_STUDIO_SHARED_KEY_ADDRESS_LIMIT", d.shared_key_address_limit,
                                          minimum=0),
            shared_key_hourly_cap=_int(env, "FLUX_STUDIO_SHARED_KEY_HOURLY_CAP", d.shared_key_hourly_cap, minimum=0),
            trusted_proxies=(_int(env, "FLUX_STUDIO_TRUSTED_PROXIES", 0)
                             if env.get("FLUX_STUDIO_TRUSTED_PROXIES", "").strip() else None),
            visitor_max_datasets=_int(env, "FLUX_STUDIO_VISITOR_MAX_DATASETS", d.visitor_max_datasets, minimum=1),
            visitor_max_bytes=_int(env, "FLUX_STUDIO_VISITOR_MAX_MB", d.visitor_max_bytes // 2**20, minimum=1) * 2**20,
            visitor_max_local_jobs=_int(env, "FLUX_STUDIO_VISITOR_MAX_LOCAL_JOBS", d.visitor_max_local_jobs, minimum=1),
            hosted=_bool(env, "FLUX_STUDIO_HOSTED", False) or bool(env.get("SPACE_ID", "").strip()),
            space_id=env.get("SPACE_ID", "").strip(),
            owner_secret=Secret(env.get("FLUX_STUDIO_OWNER_SECRET")),
        )

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    @property
    def db_path(self) -> Path:
        return (self.db_dir or self.data_dir) / "jobs.sqlite3"

    @property
    def db_backup_path(self) -> Path | None:
        """The database's copy in the data dir, when the database itself lives elsewhere."""
        return self.data_dir / "jobs.sqlite3.backup" if self.db_dir else None

    @property
    def proxy_hops(self) -> int:
        """How many X-Forwarded-For entries, from the right, trusted proxies wrote (see trusted_proxies)."""
        if self.trusted_proxies is not None:
            return self.trusted_proxies
        return 1 if self.space_id else 0

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"


    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)
