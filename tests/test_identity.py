"""Who owns what: local, signed-in, cookie visitor, page session."""
from __future__ import annotations

import gradio as gr

from components.identity import VISITOR_COOKIE, owner_for
from services.config import Settings

TOKEN = "0123456789abcdef0123456789abcdef"


def test_local_is_one_owner(tmp_path):
    assert owner_for(None, Settings(data_dir=tmp_path)) == "local"
    assert owner_for(gr.Request(username="ann"), Settings(data_dir=tmp_path)) == "local"


def test_hosted_owner_order_login_then_cookie_then_session(tmp_path):
    hosted = Settings(data_dir=tmp_path, hosted=True)
    assert owner_for(gr.Request(username="ann/../x", session_hash="s1"), hosted) == "user-ann____x"
    by_cookie = owner_for(gr.Request(cookies={VISITOR_COOKIE: TOKEN}, session_hash="s1"), hosted)
    assert by_cookie.startswith("visitor-") and TOKEN not in by_cookie  # only a hash is kept
    # Same browser, a new page session (a reload): the same owner.
    assert owner_for(gr.Request(cookies={VISITOR_COOKIE: TOKEN}, session_hash="s2"), hosted) == by_cookie
    other = owner_for(gr.Request(cookies={VISITOR_COOKIE: "f" * 32}, session_hash="s1"), hosted)
    assert other != by_cookie
    # A malformed cookie is ignored, never trusted as an id.
    assert owner_for(gr.Request(cookies={VISITOR_COOKIE: "../etc"}, session_hash="s-1"), hosted) == "session-s1"
    assert owner_for(gr.Request(session_hash="abc"), hosted) == "session-abc"
    assert owner_for(None, hosted) == "anonymous"
