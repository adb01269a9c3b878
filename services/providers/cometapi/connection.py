"""One pooled connection to CometAPI: the API key, bounded retries, and a typed error for every failure.

* The API key is a ``Secret``. It is revealed in exactly one place (``_auth_headers``), is
  never put in the ``httpx.Client`` default headers (so nothing that dumps the client shows
  it), and any text quoted from a server answer is scrubbed of it (``clean``) before it reaches
  a message.
* GETs (reads, polls, downloads) are retried with exponential backoff and jitter on 429, 5xx,
  timeouts and broken connections. A POST that may have reached the server (submit a
  fine-tune, generate, delete) is only re-sent when the connection failed *before* anything
  was sent, or on a 429 that says when to come back; otherwise the error says the request may
  have been received, because sending it again could start (and bill) the same job twice.
* Redirects are not followed on API calls: CometAPI answers some unknown paths with 301 or an
  HTML page instead of a JSON 404, and that is how "this endpoint is switched off" shows itself.
  Result links (signed URLs on a storage host) may redirect, so downloads follow them.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from services.config import Secret
from services.errors import AuthError, ConfigError, ProviderError, RateLimitedError
from services.providers.cometapi import error_mapping as errors

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=10.0)
_USER_AGENT = "flux-finetune-studio/1.0"


def _check_base_url(base_url: str) -> str:
    base_url = (base_url or "").strip().rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"COMETAPI_BASE_URL must be a web address such as https://api.cometapi.com, got {base_url!r}.",
            hint="Fix or unset it.",
        )
    return base_url


def _head_of(response: httpx.Response, limit: int) -> httpx.Response:
    """A streamed response's status, headers and first ``limit`` bytes, as a read response."""
    body = b""
    try:
        for chunk in response.iter_raw(1 << 14):
            body += chunk
            if len(body) >= limit:
                break
    finally:
        response.close()
    headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-length", "content-encoding", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=body[:limit], request=response.request)


class Connection:
    """Sends requests to one CometAPI base URL with one key, retrying what is safe to retry.

    Thread-safe (httpx.Client is). ``sleep`` and ``rand`` are injectable so tests run fast and
    deterministically.
    """

    def __init__(
        self,
        base_url: str,
        api_key: Secret | str | None,
        *,
        http_transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
    ) -> None:
        self.base_url = _check_base_url(base_url)
        self._key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        self._sleep = sleep
        self._rand = rand
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_retry_after = max_retry_after
        # Routes whose last answer was a web page: one is a passing fault, two in a row are not.
        self._pages: set[tuple[str, str]] = set()
        self._pages_lock = threading.Lock()
        # No auth in the default headers on purpose: see the module notes.
        self._http = httpx.Client(
            transport=http_transport,
            timeout=timeout,
            follow_redirects=False,
            headers={"User-Agent": _USER_AGENT, "Accept": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"Connection(base_url={self.base_url!r}, api_key={'set' if self._key else 'missing'})"

    def __reduce__(self):  # pickling would copy the key
        raise TypeError("a CometAPI connection cannot be pickled")

    @property
    def has_key(self) -> bool:
        return bool(self._key)

    def clean(self, text: str, limit: int = 300) -> str:
        """Server text made safe for a message: no key, one line, bounded length."""
        text = " ".join(str(text).split())
        key = self._key.reveal()
        if key:
            text = text.replace(key, "[key hidden]")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    # ----------------------------------------------------------------- the two ways to send

    def request(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content_factory: Callable[[], Iterator[bytes]] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        not_found: str | None = None,
    ) -> Any:
        """Call an API endpoint and return its JSON ({} for an empty body).

        ``idempotent``: safe to send again after it may have arrived. ``content_factory``: a fresh
        body iterator per attempt (a streamed upload). ``not_found``: the message for an
        id-specific 404."""
        url = self.base_url + path

        def error_for(r: httpx.Response) -> ProviderError:
            return errors.api_error(r, method, path, idempotent=idempotent, not_found=not_found, clean=self.clean,
                                    page_repeated=self._page_repeated(method, path, r))

        while True:
            response = self._send(method, url, idempotent=idempotent, params=params, json_body=json_body,
                                  content_factory=content_factory, headers=headers, timeout=timeout,
                                  error_for=error_for)
            repeated = self._page_repeated(method, path, response)
            if not response.content.strip():
                return {}
            data = errors.json_or_none(response)
            if data is not None:
                return data
            # HTML or garbage on a 2xx: a proxy or a landing page, not the API
            what = "a web page" if errors.is_html(response) else "a response that is not JSON"
            error = errors.unavailable(method, path, f"HTTP {response.status_code} with {what} instead of JSON",
                                       page_repeated=repeated or not errors.is_html(response), idempotent=idempotent)
            if not (idempotent and error.retryable):
                raise error
            # A read answered by a passing page: ask once more (a second page is not passing).

    def _page_repeated(self, method: str, path: str, response: httpx.Response) -> bool:
        """Whether ``response``, an answer to ``method path``, is a web page following another
        from the same route; remembers whether this one was."""
        route = (method, path)
        with self._pages_lock:
            repeated = route in self._pages
            if errors.is_html(response):
                self._pages.add(route)
            else:
                self._pages.discard(route)
        return repeated

    def open_link(self, url: str) -> httpx.Response:
        """A result link's 2xx response with its body unread (the caller reads and closes it).
        It follows redirects and never carries the API key: the link is a signed URL on a storage host."""
        return self._send("GET", url, idempotent=True, auth=False, headers={"Accept": "*/*"},
                          error_for=errors.download_error, stream=True)

    # ----------------------------------------------------------------- send + retry

    def _auth_headers(self) -> dict[str, str]:
        if not self._key:
            raise AuthError(
                "No CometAPI key is set. Set COMETAPI_KEY or enter a key in the app's settings.",
                hint="Get a key from your CometAPI dashboard (cometapi.com).",
            )
        return {"Authorization": f"Bearer {self._key.reveal()}"}  # the one place the key is revealed

    def _send(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool,
        error_for: Callable[[httpx.Response], ProviderError],
        auth: bool = True,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content_factory: Callable[[], Iterator[bytes]] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send with bounded retries; return a 2xx response or raise a mapped error.

        ``stream``: a download. Its 2xx body is left unread for the caller (who must close the
        response), and redirects are followed; API calls never follow one."""
        what = f"{method} {urlsplit(url).path}"
        attempt = 0
        waited_for_rate_limit = 0.0
        while True:
            attempt += 1
            all_headers = {**(self._auth_headers() if auth else {}), **(headers or {})}
            request = self._http.build_request(
                method,
                url,
                params=params,
                json=json_body if content_factory is None else None,
                content=content_factory() if content_factory is not None else None,
                headers=all_headers,
                timeout=timeout or self._timeout,
            )
            started = time.monotonic()
            try:
                response = self._http.send(request, stream=stream, follow_redirects=stream)
            except httpx.UnsupportedProtocol:
                raise ConfigError(
                    f"COMETAPI_BASE_URL or the result link uses an unsupported protocol ({what}).",
                    hint="Use an https:// address.",
                ) from None
            except httpx.TransportError as exc:
                error = errors.transport_error(exc, url, idempotent=idempotent)
                if (idempotent or errors.not_sent(exc)) and attempt < self._max_attempts:
                    delay = self._backoff(attempt)
                    log.warning("CometAPI %s: %s; retrying in %.1f s (attempt %d/%d)", what,
                                errors.describe_transport_error(exc), delay, attempt + 1, self._max_attempts)
                    self._sleep(delay)
                    continue
                raise error from exc
            log.debug("CometAPI %s -> %d in %.2f s", what, response.status_code, time.monotonic() - started)
            if 200 <= response.status_code < 300:
                return response
            if stream:  # an error page: its first 64 KiB are plenty to say what went wrong
                response = _head_of(response, 1 << 16)
            error = error_for(response)
            # A 429 that says when to come back means the service processed nothing: sending it again
            # is safe even for a paid POST, within max_retry_after seconds of waiting in all.
            come_back = isinstance(error, RateLimitedError) and error.retry_after is not None
            if not ((idempotent and error.retryable) or come_back) or attempt >= self._max_attempts:
                raise error
            delay = self._retry_delay(error, attempt)
            if delay is None:
                raise error
            if not idempotent:
                if waited_for_rate_limit + delay > self._max_retry_after:
                    raise error
                waited_for_rate_limit += delay
            log.warning("CometAPI %s answered %d; retrying in %.1f s (attempt %d/%d)", what,
                        response.status_code, delay, attempt + 1, self._max_attempts)
            self._sleep(delay)

    def _retry_delay(self, error: ProviderError, attempt: int) -> float | None:
        """How long to wait before the next try; None when the server asked for too long."""
        if isinstance(error, RateLimitedError) and error.retry_after is not None:
            return error.retry_after if error.retry_after <= self._max_retry_after else None
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random."""
        delay = min(self._backoff_cap, self._backoff_base * 2 ** (attempt - 1))
        return delay * (0.5 + 0.5 * self._rand())
