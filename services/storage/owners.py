"""Where an owner's files live on disk.

Hosted, every visitor's files sit under ``owners/<token>/`` where the token is an HMAC of the
owner id with a per-installation secret, so that a folder name can't be computed from an owner
id (a user name, say). The local owner keeps the plain layout.

The secret comes from ``FLUX_STUDIO_OWNER_SECRET`` when set (a Space secret), else from
``<data_dir>/.owner-secret``, made on first use. Losing it would orphan every owner's folder,
so a missing or unreadable secret next to existing owner folders is an error that stops the
app, never a reason to make a new one.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from pathlib import Path

from services.storage import atomic
from services.config import Settings
from services.errors import ConfigError

LOCAL_OWNER = "local"
SECRET_FILE = ".owner-secret"
_SECRET_BYTES = 32
_lock = threading.Lock()


def _parse(text: str) -> bytes | None:
    try:
        value = bytes.fromhex(text.strip())
    except ValueError:
        return None
    return value if len(value) == _SECRET_BYTES else None


def installation_secret(settings: Settings) -> bytes:
    """The secret that keys owner folder names; see the module docstring for where it lives."""
    if settings.owner_secret:
        value = _parse(settings.owner_secret.reveal())
        if value is None:
            raise ConfigError(f"FLUX_STUDIO_OWNER_SECRET must be {_SECRET_BYTES * 2} hex digits.",
                              hint="Set it to the value of the installation's .owner-secret file.")
        return value
    path = settings.data_dir / SECRET_FILE
    with _lock:
        try:
            value = _parse(path.read_text())
        except FileNotFoundError:
            value = None
            missing = True
        except OSError:
            value, missing = None, False
        else:
            missing = False
        if value is not None:
            return value
        owners = settings.data_dir / "owners"
        if owners.is_dir() and any(owners.iterdir()):
            state = "missing" if missing else "unreadable"
            raise ConfigError(
                f"The owner secret {path} is {state}, but visitors' folders exist in {owners}. "
                "A new secret would cut every visitor off from their work.",
                hint="Restore the file from a backup, or set FLUX_STUDIO_OWNER_SECRET to its value.")
        value = secrets.token_bytes(_SECRET_BYTES)
        atomic.write_text(path, value.hex(), mode=0o600)
        return value


def owner_dir(settings: Settings, owner: str) -> Path:
    """The folder holding everything of ``owner`` (datasets, results, local runs)."""
    if owner == LOCAL_OWNER:
        return settings.data_dir
    token = hmac.new(installation_secret(settings), owner.encode("utf-8"), hashlib.sha256).hexdigest()[:32]
    return settings.data_dir / "owners" / token


def sweep_empty(settings: Settings) -> int:
    """Remove the owner folders that hold no file (left by calls that never wrote: a cookie-less call is
    an owner of its own); how many went. Only empty folders are removed (rmdir), so a file is never
    lost, and it runs before the app serves anyone, so no first write races it."""
    owners = settings.data_dir / "owners"
    if not owners.is_dir():
        return 0
    removed = 0
    for folder in owners.iterdir():
        if not folder.is_dir() or folder.is_symlink() or any(not p.is_dir() for p in folder.rglob("*")):
            continue
        try:
            for sub in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                os.rmdir(sub)  # deepest first: each is empty by the time it is removed
            os.rmdir(folder)
        except OSError:  # not ours to remove after all (permissions): it stays, as it was
            continue
        removed += 1
    return removed
