"""Who is using the app: the owner every dataset, job and result belongs to."""
from __future__ import annotations

import re

import gradio as gr

from services.config import Settings

LOCAL_OWNER = "local"


def owner_for(request: gr.Request | None, settings: Settings) -> str:
    """Locally everything belongs to one person; hosted, each login or browser session is its own owner.

    ``gr.Request`` is None when a handler is called directly (tests, notebooks).
    """
    if not settings.hosted or request is None:
        return LOCAL_OWNER
    username = getattr(request, "username", None)
    if username:
        return "user-" + re.sub(r"[^A-Za-z0-9_-]", "_", username)[:64]
    session = getattr(request, "session_hash", None) or ""
    return "session-" + re.sub(r"[^A-Za-z0-9]", "", session)[:32] if session else LOCAL_OWNER
