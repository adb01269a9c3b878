"""Hosted mode's header: sign-in (on a Space) and a visitor's own CometAPI key for this session."""
from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from components import feedback
from components.identity import caller_for
from services.caller import Caller
from services.config import Secret, Settings


def build(settings: Settings, on_key: Callable[[Caller], None]) -> gr.State:
    """Returns the per-session key state (None until a visitor enters a key). ``on_key`` is told of the
    caller who just entered one (``Studio.adopt``: their jobs on it are tracked again).

    The key lives in gr.State, which stays on the server: it is never rendered, logged,
    written to disk or sent back to the page (the box is cleared as soon as it is used).
    """
    key_state = gr.State(None)
    if not settings.hosted:
        return key_state
    with gr.Accordion("Your CometAPI key and sign-in", open=not bool(settings.cometapi_key)):
        with gr.Row():
            if settings.space_id:
                # Only on a Space: outside one, LoginButton breaks local and CI launches.
                gr.LoginButton(scale=1)
            key_box = gr.Textbox(
                label="Your CometAPI key (this session only)", type="password", scale=3, elem_id="session-key",
                info="Kept in this server's memory for this browser session; never stored, logged or shown again.",
            )
            use = gr.Button("Use my key", scale=1, elem_id="session-key-use")
            forget = gr.Button("Forget it", scale=1, size="sm")
        status = gr.Markdown(elem_id="session-key-status")

    def on_use(raw: str, request: gr.Request = None):
        raw = (raw or "").strip()
        if not raw:
            feedback.warning("The key box is empty. Paste your CometAPI key, then press 'Use my key'.")
            return None, "", "No key set for this session."
        if any(c.isspace() for c in raw) or len(raw) > 200:
            feedback.warning("That does not look like a CometAPI key (it has spaces or is too long). Paste it again.")
            return None, "", "No key set for this session."
        key = Secret(raw)
        on_key(caller_for(request, settings, key))
        return key, "", "✅ Your key is set for this browser session."

    use.click(on_use, [key_box], [key_state, key_box, status], show_progress="hidden")
    key_box.submit(on_use, [key_box], [key_state, key_box, status], show_progress="hidden")
    forget.click(lambda: (None, "", "Key forgotten."), None, [key_state, key_box, status])
    return key_state
