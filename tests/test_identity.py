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


def test_the_client_address_is_the_one_the_trusted_proxies_saw_never_what_the_client_wrote(tmp_path):
    from starlette.requests import Request

    from components.identity import client_address

    def request(*forwarded: str, peer: str = "10.9.9.9") -> gr.Request:
        headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
        return gr.Request(request=Request({"type": "http", "headers": headers, "client": (peer, 5000)}))

    space = Settings(data_dir=tmp_path, hosted=True, space_id="someone/studio")
    assert space.proxy_hops == 1  # a Space: Hugging Face's proxy appends the address it saw
    assert client_address(request("6.6.6.6, 7.7.7.7, 198.51.100.7"), space) == "198.51.100.7"
    assert client_address(request("198.51.100.7"), space) == "198.51.100.7"
    # Two headers are one list: the proxy's entry is the last of all of them, not the first header's.
    assert client_address(request("6.6.6.6", "198.51.100.7"), space) == "198.51.100.7"
    assert client_address(request(), space) == "10.9.9.9"  # not through the proxy: the connection's own

    elsewhere = Settings(data_dir=tmp_path, hosted=True)
    assert elsewhere.proxy_hops == 0  # nothing in front: the header is the client's writing only
    assert client_address(request("6.6.6.6"), elsewhere) == "10.9.9.9"
    two = elsewhere.with_(trusted_proxies=2)  # a load balancer, then a reverse proxy
    assert client_address(request("6.6.6.6, 198.51.100.7, 10.0.0.3"), two) == "198.51.100.7"
    assert client_address(request("10.0.0.3"), two) == "10.9.9.9"  # too few entries: not through both
    assert client_address(request("6.6.6.6"), space.with_(trusted_proxies=0)) == "10.9.9.9"
    assert client_address(None, space) == ""


def test_trusted_proxies_come_from_the_environment_with_a_default_for_spaces():
    import pytest

    from services.errors import ConfigError

    assert Settings.from_env({}).proxy_hops == 0
    assert Settings.from_env({"SPACE_ID": "someone/studio"}).proxy_hops == 1
    assert Settings.from_env({"SPACE_ID": "someone/studio", "FLUX_STUDIO_TRUSTED_PROXIES": "2"}).proxy_hops == 2
    assert Settings.from_env({"FLUX_STUDIO_TRUSTED_PROXIES": "0", "SPACE_ID": "a/b"}).proxy_hops == 0
    with pytest.raises(ConfigError, match="FLUX_STUDIO_TRUSTED_PROXIES must be at least 0"):
        Settings.from_env({"FLUX_STUDIO_TRUSTED_PROXIES": "-1"})
