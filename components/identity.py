"""Who is using the app: the owner every dataset, job and result belongs to."""
from __future__ import annotations

import re

import gradio as gr

from services.config import Settings
from services.owners import LOCAL_OWNER

ANONYMOUS = "anonymous"


def owner_for(request: gr.Request | None, settings: Settings) -> str:
    """Locally everything belongs to one person; hosted, each login or browser session is its own owner.

    ``gr.Request`` is None when a handler is called directly (tests, notebooks). Hosted, that
    and a request without a session never fall back to the local owner's files.
    """
    if not settings.hosted:
        return LOCAL_OWNER
    username = getattr(request, "username", None) if request is not None else None
    if username:
        return "user-" + re.sub(r"[^A-Za-z0-9_-]", "_", username)[:64]
    session = (getattr(request, "session_hash", None) or "") if request is not None else ""
    session = re.sub(r"[^A-Za-z0-9]", "", session)[:64]
    return f"session-{session}" if session else ANONYMOUS
