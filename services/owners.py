"""Where an owner's files live on disk.

Hosted, every visitor's files sit under ``owners/<token>/`` where the token is an HMAC of the
owner id with a random per-installation secret. Gradio serves files by absolute path, so an
unguessable folder name makes a file URL a capability: knowing someone's user name is not
enough to fetch their images. The local owner keeps the plain layout.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from services.config import Settings

LOCAL_OWNER = "local"
_lock = threading.Lock()


def _installation_secret(data_dir: Path) -> bytes:
    path = data_dir / ".owner-secret"
    with _lock:
        try:
            return bytes.fromhex(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            data_dir.mkdir(parents=True, exist_ok=True)
            value = secrets.token_bytes(32)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(value.hex())
            os.replace(tmp, path)
            return value


def owner_dir(settings: Settings, owner: str) -> Path:
    """The folder holding everything of ``owner`` (datasets, results, local runs)."""
    if owner == LOCAL_OWNER:
        return settings.data_dir
    token = hmac.new(_installation_secret(settings.data_dir), owner.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
    return settings.data_dir / "owners" / token
