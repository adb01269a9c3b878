"""Visitor tokens for hosted mode: minted by the server, checked by the server.

A token is ``<random>.<mac>``: 128 random bits and an HMAC of them with the installation secret
(``services.storage.owners``), so a value a client makes up is simply not a token. The owner id kept in
job rows and used for folder names is a keyed hash of the random part; the token itself, the
capability, is stored nowhere.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from services.config import Settings
from services.storage.owners import installation_secret

_TOKEN_RE = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{32})")


def _mac(secret: bytes, value: str, purpose: str) -> str:
    return hmac.new(secret, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()[:32]


def mint(settings: Settings) -> str:
    """A new visitor token, for a cookie the browser can't read (HttpOnly)."""
    value = secrets.token_hex(16)
    return f"{value}.{_mac(installation_secret(settings), value, 'token')}"


def owner_of(settings: Settings, token: str | None) -> str | None:
    """The owner id a token stands for, or None when it is not one this server minted."""
    match = _TOKEN_RE.fullmatch(token or "")
    if not match:
        return None
    value, mac = match.groups()
    secret = installation_secret(settings)  # read once per request (the gate calls this on each)
    if not hmac.compare_digest(mac, _mac(secret, value, "token")):
        return None
    return "visitor-" + _mac(secret, value, "owner")
