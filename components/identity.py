"""Who is using the app: the owner every dataset, job and result belongs to."""
from __future__ import annotations

import re
import secrets
import tempfile
from http.cookies import CookieError, SimpleCookie
from typing import IO

import gradio as gr
from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse

from services.caller import LOCAL_OWNER, Caller
from services.config import Secret, Settings
from services.storage import visitors

ANONYMOUS = "anonymous"
VISITOR_COOKIE = "flux_studio_visitor"
# A year: the cookie is what brings a visitor back to their work after a reload or a restart.
COOKIE_MAX_AGE_S = 365 * 24 * 3600
# Pages a Space is shown in: its own *.hf.space origin, inside huggingface.co's frame.
SPACE_ORIGINS = re.compile(r"https://([a-z0-9-]+\.hf\.space|huggingface\.co)")
_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# A chunked upload is kept in memory up to this, then on disk; handed on in pieces of SPOOL_CHUNK.
SPOOL_IN_MEMORY = 1 << 20
SPOOL_CHUNK = 1 << 20


def owner_for(request: gr.Request | None, settings: Settings) -> str:
    """Locally everything belongs to one person; hosted, each login or each browser is its own owner.

    Hosted identity is set by the server only: a Hugging Face sign-in (on a Space), else the
    ``--auth`` login, else a token the server
    minted into an HttpOnly cookie (``VisitorGate``). Gradio's ``session_hash`` is chosen by the
    client and is never an identity. A request with no valid token (a browser that refuses the
    cookie) gets an owner of its own that nobody else can reach, not a shared one.
    ``gr.Request`` is None only when a handler is called directly (tests, notebooks).
    """
    if not settings.hosted:
        return LOCAL_OWNER
    if request is None:
        return ANONYMOUS
    signed_in = hf_username(request)
    if signed_in:
        return "hf-" + re.sub(r"[^A-Za-z0-9_-]", "_", signed_in)[:64]
    username = getattr(request, "username", None)
    if username:
        return "user-" + re.sub(r"[^A-Za-z0-9_-]", "_", username)[:64]
    owner = visitors.owner_of(settings, _cookie(request))
    if owner:
        return owner
    # One throwaway owner per event, however often its handler asks (gr.Request is per event).
    owner = vars(request).get("_studio_owner") or "nocookie-" + secrets.token_hex(16)
    request._studio_owner = owner
    return owner


def caller_for(request: gr.Request | None, settings: Settings, key: Secret | None = None) -> Caller:
    """Who ``request`` is for, built once per event and handed to ``Studio``: its owner, the visitor's own
    CometAPI key (``key``, from the page's session), their Hugging Face sign-in and their address.
    ``request`` is None only when a handler is called directly (tests, notebooks)."""
    return Caller(owner_for(request, settings), key or None, hf_token_of(request), client_address(request, settings))


def hf_username(request: gr.Request) -> str:
    """The Hugging Face user signed in with the Space's LoginButton, or "".

    Gradio hands handlers this as a ``gr.OAuthProfile`` parameter; reading the same session here
    (with Gradio's own helpers, so expiry is honoured the same way) makes the sign-in the owner
    for every handler without adding that parameter to each one."""
    from gradio.helpers import _session_from_request
    from gradio.oauth import _get_valid_oauth_info_from_session

    try:
        info = _get_valid_oauth_info_from_session(_session_from_request(request))
    except Exception:  # no session middleware (no LoginButton): nobody is signed in
        return ""
    user = (info or {}).get("userinfo") or {}
    name = user.get("preferred_username")
    return name if isinstance(name, str) else ""


def hf_token_of(request: gr.Request | None) -> Secret | None:
    """The signed-in visitor's Hugging Face OAuth token (the Space's LoginButton), None when nobody is.

    Read from the same session as ``hf_username`` (what Gradio would hand a ``gr.OAuthToken``
    parameter), so every handler can reach it without one more parameter. It stays in the server's
    signed session cookie and in memory: never written to disk, a job record or a page."""
    if request is None:
        return None
    from gradio.helpers import _session_from_request
    from gradio.oauth import _get_valid_oauth_info_from_session

    try:
        info = _get_valid_oauth_info_from_session(_session_from_request(request))
    except Exception:  # no session middleware (no LoginButton): nobody is signed in
        return None
    token = (info or {}).get("access_token")
    return Secret(token) if isinstance(token, str) and token else None


def client_address(request: gr.Request | None, settings: Settings) -> str:
    """The address a request came from, for the shared-key budget.

    Each proxy appends the address it was reached from to X-Forwarded-For, after whatever the client
    sent: only the right-most ``settings.proxy_hops`` entries were written by proxies the app trusts
    (1 on a Space: Hugging Face's). The one furthest left of those is the client's; anything before it
    is the client's own writing. A header with fewer entries did not come through the proxies: the
    connection's own address is used then, as with no proxies at all."""
    if request is None:
        return ""
    hops = settings.proxy_hops
    if hops:
        headers = request.headers
        # Several X-Forwarded-For headers are one list, in order (RFC 9110), not just the first.
        lines = headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else [headers.get("x-forwarded-for")]
        entries = [e.strip() for line in lines if line for e in line.split(",") if e.strip()]
        if len(entries) >= hops:
            return entries[-hops]
    client = getattr(request, "client", None)
    return getattr(client, "host", "") or ""


def _cookie(request: gr.Request) -> str:
    # gr.Request turns the cookie dict into its own mapping type: index it, don't .get() it.
    try:
        token = request.cookies[VISITOR_COOKIE]
    except (AttributeError, KeyError, TypeError):
        return ""
    return token if isinstance(token, str) else ""


class VisitorGate:
    """ASGI middleware for hosted mode (``launch_options`` installs it).

    * Answers 404 to ``/gradio_api/deep_link``, which dumps a session's component values (a
      pasted token among them) to a file whose name then loads them into any page.
    * Refuses state-changing requests (POST, ...) whose ``Origin`` is another site's: Gradio echoes
      any origin with credentials, so without this a page elsewhere could act as a visitor.
      Requests with no Origin (scripts, gradio_client) carry no one else's cookie and pass.
    * Gives every client without a valid visitor cookie a fresh server-minted one: HttpOnly (no
      script can read it), and Secure, SameSite=None and Partitioned (CHIPS) over HTTPS, so it
      works inside huggingface.co's frame. gradio_client keeps the cookie from its first request.
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if scope["path"].rstrip("/").endswith("/gradio_api/deep_link"):
            return await PlainTextResponse("Not found.", status_code=404)(scope, receive, send)
        if scope["method"] in _UNSAFE_METHODS and not self._same_site(headers, scope):
            response = PlainTextResponse("Requests from other sites are refused.", status_code=403)
            return await response(scope, receive, send)
        known = bool(visitors.owner_of(self.settings, _cookie_from(headers)))
        if scope["method"] == "POST" and scope["path"].rstrip("/").endswith("/gradio_api/upload"):
            refusal = self._upload_refusal(headers, known)
            if refusal is not None:
                return await refusal(scope, receive, send)
            if "content-length" not in headers or "transfer-encoding" in headers:
                return await self._spooled_upload(scope, receive, send)
            # Otherwise the server reads exactly Content-Length bytes, which _upload_refusal has capped.
        if known or headers.get("x-gradio-user") == "mcp":
            # Gradio's MCP server calls the app through one shared client with each assistant's own
            # headers: it identifies by the cookie it forwards. A cookie minted for that shared client
            # would be kept by it and sent for every assistant without one of its own.
            return await self.app(scope, receive, send)
        cookie = self._set_cookie(visitors.mint(self.settings), _is_https(headers, scope))

        async def send_with_cookie(message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"set-cookie", cookie.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    def _upload_refusal(self, headers: Headers, known: bool) -> PlainTextResponse | None:
        """Gradio's upload route takes up to 1,000 files of ``max_file_size`` each per request: only a
        visitor the server knows may upload, and one request carries at most ``max_upload_bytes``."""
        if not known:
            return PlainTextResponse("Open the app before uploading.", status_code=403)
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return PlainTextResponse("Bad Content-Length.", status_code=400)
        if length > self.settings.max_upload_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> PlainTextResponse:
        return PlainTextResponse(f"An upload may be at most {self.settings.max_upload_bytes // 2**20} MB.",
                                 status_code=413)

    async def _spooled_upload(self, scope, receive, send) -> None:
        """An upload with no Content-Length (sent chunked): read whole into a file of the gate's own, up
        to ``max_upload_bytes``, then handed on with its length. Gradio writes a body to its upload folder
        as it arrives and leaves there whatever a body cut short had sent (and answers 500): a body over
        the cap is refused here with 413 before Gradio sees a byte of it. The spool has no name on disk,
        so it is gone once closed, whatever happens."""
        limit = self.settings.max_upload_bytes
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > limit:
                    return await self._too_large()(scope, receive, send)
                spool.write(body)
                more = message.get("more_body", False)
            spool.seek(0)
            kept = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"transfer-encoding")]
            scope = {**scope, "headers": [*kept, (b"content-length", str(size).encode())]}
            await self.app(scope, _replay(spool, size, receive), send)

    def _same_site(self, headers: Headers, scope) -> bool:
        origin = headers.get("origin")
        if origin is None:
            return True
        host = headers.get("host", "")
        if origin in (f"http://{host}", f"https://{host}"):
            return True
        return bool(self.settings.space_id) and bool(SPACE_ORIGINS.fullmatch(origin))

    @staticmethod
    def _set_cookie(token: str, https: bool) -> str:
        flags = "; Secure; SameSite=None; Partitioned" if https else "; SameSite=Lax"
        return f"{VISITOR_COOKIE}={token}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; HttpOnly{flags}"


def _replay(spool: IO[bytes], size: int, receive):
    """A ``receive`` that gives the spooled body, then the connection's own messages (a disconnect)."""

    given = False

    async def replay():
        nonlocal given
        if given:
            return await receive()
        body = spool.read(SPOOL_CHUNK)
        given = spool.tell() >= size
        return {"type": "http.request", "body": body, "more_body": not given}

    return replay


def _cookie_from(headers: Headers) -> str:
    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except CookieError:
        return ""
    morsel = jar.get(VISITOR_COOKIE)
    return morsel.value if morsel else ""


def _is_https(headers: Headers, scope) -> bool:
    # Spaces terminate TLS at a proxy, which says so in X-Forwarded-Proto.
    return scope.get("scheme") == "https" or headers.get("x-forwarded-proto", "").split(",")[0].strip() == "https"
