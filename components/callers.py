"""The caller a request is made for (``services.caller.Caller``): built once per request, here only."""
from __future__ import annotations

import gradio as gr

from components.identity import client_address, hf_token_of, owner_for
from services.caller import Caller
from services.config import Secret, Settings


def caller_for(request: gr.Request | None, settings: Settings, key: Secret | None = None) -> Caller:
    """Who ``request`` is for: its owner, the visitor's own CometAPI key (``key``, from the page's session),
    their Hugging Face sign-in and their address. ``request`` is None only when a handler is called directly."""
    return Caller(owner_for(request, settings), key or None, hf_token_of(request), client_address(request, settings))
