"""Who owns what: local, signed-in, or a visitor known by a token only the server can mint."""
from __future__ import annotations

import gradio as gr

from components.identity import VISITOR_COOKIE, owner_for
from services.storage import visitors
from services.config import Settings


def test_local_is_one_owner(tmp_path):
    assert owner_for(None, Settings(data_dir=tmp_path)) == "local"
    assert owner_for(gr.Request(username="ann"), Settings(data_dir=tmp_path)) == "local"


def test_hosted_owner_is_the_login_or_a_server_minted_token_never_the_session(tmp_path):
    hosted = Settings(data_dir=tmp_path, hosted=True)
    assert owner_for(gr.Request(username="ann/../x", session_hash="s1"), hosted) == "user-ann____x"
    token = visitors.mint(hosted)
    by_cookie = owner_for(gr.Request(cookies={VISITOR_COOKIE: token}, session_hash="s1"), hosted)
    assert by_cookie.startswith("visitor-") and token.split(".")[0] not in by_cookie  # a keyed hash only
    # Same browser, a new page session (a reload): the same owner.
    assert owner_for(gr.Request(cookies={VISITOR_COOKIE: token}, session_hash="s2"), hosted) == by_cookie
    assert owner_for(gr.Request(cookies={VISITOR_COOKIE: visitors.mint(hosted)}), hosted) != by_cookie
    # A token the client made up (or one with its MAC changed) is no token: a fresh owner each time,
    # never the session's and never a shared one.
    forged = token.split(".")[0] + "." + "0" * 32
    for cookies, session in (({VISITOR_COOKIE: forged}, "s1"), ({VISITOR_COOKIE: "f" * 32}, "s1"), ({}, "abc")):
        event = gr.Request(cookies=cookies, session_hash=session)
        first = owner_for(event, hosted)
        again = owner_for(gr.Request(cookies=cookies, session_hash=session), hosted)
        assert first.startswith("nocookie-") and first != again and session not in first
        assert owner_for(event, hosted) == first  # stable within one event's handler
    assert owner_for(None, hosted) == "anonymous"


def test_a_hugging_face_sign_in_is_the_owner_until_it_expires(tmp_path):
    import time

    from starlette.requests import Request

    hosted = Settings(data_dir=tmp_path, hosted=True)

    def signed_in(expires_at: float, cookie: str = "") -> gr.Request:
        session = {"oauth_info": {"userinfo": {"preferred_username": "ann-hf", "name": "Ann"},
                                  "access_token": "hf_oauth_token", "expires_at": expires_at}}
        headers = [(b"cookie", f"{VISITOR_COOKIE}={cookie}".encode())] if cookie else []
        return gr.Request(request=Request({"type": "http", "headers": headers, "session": session}))

    assert owner_for(signed_in(time.time() + 3600), hosted) == "hf-ann-hf"
    token = visitors.mint(hosted)
    expired = owner_for(signed_in(time.time() - 1, cookie=token), hosted)
    assert expired == owner_for(gr.Request(cookies={VISITOR_COOKIE: token}), hosted)  # back to the browser's
