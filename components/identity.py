"""Who is using the app: the owner every dataset, job and result belongs to."""
from __future__ import annotations

import hashlib
import re

import gradio as gr

from services.config import Settings
from services.owners import LOCAL_OWNER

ANONYMOUS = "anonymous"
VISITOR_COOKIE = "flux_studio_visitor"
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")

# Hosted and not signed in, a visitor is known by a random token their browser keeps in a cookie,
# so a reload finds their work again. Set before the app's first request (launch(head=...)).
# Cross-site frames (a Space inside huggingface.co) need SameSite=None; Secure; where the browser
# refuses the cookie, identity falls back to the page session.
VISITOR_HEAD = """<script>
(function () {
  try {
    var name = "%s=";
    if (document.cookie.split("; ").some(function (c) { return c.indexOf(name) === 0; })) return;
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    var token = Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
    var secure = location.protocol === "https:";
    document.cookie = name + token + "; path=/; max-age=31536000; SameSite=" + (secure ? "None; Secure" : "Lax");
  } catch (e) { /* no cookies: the session identifies the visitor */ }
})();
</script>""" % VISITOR_COOKIE


def owner_for(request: gr.Request | None, settings: Settings) -> str:
    """Locally everything belongs to one person; hosted, each login, browser or session is its own owner.

    ``gr.Request`` is None when a handler is called directly (tests, notebooks). Hosted, that
    and a request without a session never fall back to the local owner's files.
    """
    if not settings.hosted:
        return LOCAL_OWNER
    if request is None:
        return ANONYMOUS
    username = getattr(request, "username", None)
    if username:
        return "user-" + re.sub(r"[^A-Za-z0-9_-]", "_", username)[:64]
    token = _visitor_token(request)
    if token:
        # Only a hash is kept (in job rows, folder names): the token itself is the capability.
        return "visitor-" + hashlib.sha256(token.encode()).hexdigest()[:32]
    session = re.sub(r"[^A-Za-z0-9]", "", getattr(request, "session_hash", None) or "")[:64]
    return f"session-{session}" if session else ANONYMOUS


def _visitor_token(request: gr.Request) -> str:
    # gr.Request turns the cookie dict into its own mapping type: index it, don't .get() it.
    try:
        token = request.cookies[VISITOR_COOKIE]
    except (AttributeError, KeyError, TypeError):
        return ""
    return token if isinstance(token, str) and _TOKEN_RE.fullmatch(token) else ""
