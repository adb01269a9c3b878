"""The secrets guard: refuses to keep anything that looks like a credential in a job row.

A job's ``params`` and ``result`` (and its events) are shown in the UI and kept on disk, so a
slip that passes an API key along must fail loudly instead of persisting it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from services.config import Secret
from services.errors import JobError

# Key names that mean "a credential". Compared after lower-casing and turning "-"/" " into "_",
# so "X-API-Key" and "Authorization" are caught. Exact names, plus a few suffixes, because a
# plain substring test ("key" in name) would refuse harmless params such as "keyword".
_SECRET_NAMES: frozenset[str] = frozenset(
    {
        "api_key",
        "apikey",
        "key",
        "token",
        "access_token",
        "refresh_token",
        "auth_token",
        "bearer_token",
        "id_token",
        "hf_token",
        "authorization",
        "auth",
        "bearer",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "private_key",
        "secret_key",
        "cookie",
    }
)
_SECRET_SUFFIXES: tuple[str, ...] = ("_api_key", "_apikey", "_secret", "_password", "_secret_key", "_private_key")
# Values that look like a bearer key (CometAPI / OpenAI style "sk-..."). A caption or prompt has
# spaces, so this does not fire on ordinary text.
_SECRET_VALUE = re.compile(r"^(?:Bearer\s+)?sk-[A-Za-z0-9_\-]{16,}$")


def _normalise_key(key: str) -> str:
    return re.sub(r"[\s\-.]+", "_", key.strip().lower())


def is_secret_key(key: str) -> bool:
    norm = _normalise_key(key)
    return norm in _SECRET_NAMES or norm.endswith(_SECRET_SUFFIXES)


def reject_secrets(value: Any, where: str, path: str = "") -> None:
    """Raise JobError if ``value`` (nested dicts/lists) holds anything that looks like a secret.

    Defence in depth: callers should never pass keys here, but a job row is shown in the UI and
    kept on disk, so a slip must fail loudly instead of persisting a credential.
    """
    if isinstance(value, Mapping):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if is_secret_key(str(k)):
                raise JobError(
                    f"Refusing to store {where} field {here!r}: it looks like a credential.",
                    hint="API keys are never saved with a job; pass them only to the provider client.",
                )
            reject_secrets(v, where, here)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            reject_secrets(v, where, f"{path}[{i}]")
    elif isinstance(value, str) and _SECRET_VALUE.match(value.strip()):
        raise JobError(
            f"Refusing to store {where} field {path or '(value)'!r}: the value looks like an API key.",
            hint="API keys are never saved with a job.",
        )
    elif isinstance(value, Secret):
        raise JobError(f"Refusing to store {where} field {path!r}: it is a Secret.")
