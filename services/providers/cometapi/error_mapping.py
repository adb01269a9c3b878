"""What each CometAPI failure becomes: an answer (HTTP status, error body) or a broken connection,
turned into the ``services.errors`` class that says what went wrong and what to do.

Server text quoted in a message goes through the caller's ``clean`` first, which takes the API key
out of it (a server may echo the key back).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from services.errors import (
    AuthError,
    EndpointUnavailableError,
    InsufficientCreditsError,
    NetworkError,
    ProviderError,
    RateLimitedError,
    ResultExpiredError,
    ServerError,
    TaskNotFoundError,
    ValidationError,
)
from services.providers.cometapi.fields import as_float

# Texts a JSON 404 carries when the *route* is missing (FastAPI / one-api style), as opposed
# to "this id does not exist".
_GENERIC_NOT_FOUND = re.compile(r"^\s*(not found|invalid url\b.*|page not found|404.*)\s*$", re.I | re.S)

# Hint shared by every answer that shows fine-tuning is switched off upstream.
_FINETUNE_UNAVAILABLE_HINT = (
    "CometAPI lists FLUX fine-tuning as \"temporarily unavailable\" (Black Forest Labs retired "
    "its fine-tuning API). Use the Local engine to train and generate instead, or try CometAPI "
    "again later."
)
MAYBE_RECEIVED_HINT = (
    "The request may have reached CometAPI. Check the jobs list (for fine-tunes: refresh "
    "\"My fine-tunes\") before trying again, so the same job is not started and charged twice."
)


# --------------------------------------------------------------------------- reading an answer


def is_html(response: httpx.Response) -> bool:
    ctype = response.headers.get("content-type", "").lower()
    return "html" in ctype or response.content.lstrip()[:1] == b"<"


def json_or_none(response: httpx.Response) -> Any:
    if not response.content.strip():
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _server_text(body: Any) -> tuple[str, str, str]:
    """(message, param, code) from any of the error shapes the contract lists."""
    if not isinstance(body, dict):
        return "", "", ""
    err = body.get("error")
    if isinstance(err, dict):  # CometAPI / OpenAI envelope
        return (str(err.get("message") or ""), str(err.get("param") or ""), str(err.get("code") or ""))
    detail = body.get("detail")
    if isinstance(detail, str):  # FastAPI / BFL
        return detail, "", ""
    if isinstance(detail, list):
        return "; ".join(f"{k}: {v}" for k, v in _detail_fields(detail).items()), "", ""
    message = body.get("message") or (err if isinstance(err, str) else "")
    return str(message or ""), "", str(err if isinstance(err, str) else "")


def _detail_fields(detail: Sequence[Any]) -> dict[str, str]:
    """BFL / FastAPI ``detail`` list -> {field: message}; ``loc`` drops the body/query prefix."""
    fields: dict[str, str] = {}
    for item in detail:
        if not isinstance(item, dict):
            continue
        loc = [str(p) for p in (item.get("loc") or []) if p not in ("body", "query", "path")]
        name = ".".join(loc) or "request"
        msg = str(item.get("msg") or item.get("message") or "is not valid")
        fields[name] = f"{fields[name]}; {msg}" if name in fields else msg
    return fields


def _parse_retry_after(value: str | None, body: Any) -> float | None:
    """Seconds to wait, from a Retry-After header (seconds or HTTP date) or BFL's body field."""
    if value:
        value = value.strip()
        number = as_float(value)
        if number is not None:
            return max(0.0, number)
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
    if isinstance(body, dict):
        number = as_float(body.get("retry_after"))
        if number is not None:
            return max(0.0, number)
    return None


# --------------------------------------------------------------------------- broken connections


def describe_transport_error(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connecting timed out"
    if isinstance(exc, httpx.ReadTimeout):
        return "no answer in time"
    if isinstance(exc, httpx.WriteTimeout):
        return "sending timed out"
    if isinstance(exc, httpx.PoolTimeout):
        return "too many requests already open"
    if isinstance(exc, httpx.ConnectError):
        return "could not connect"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return "the connection was closed before the answer arrived"
    if isinstance(exc, httpx.WriteError):
        return "the connection broke while sending"
    return exc.__class__.__name__


def not_sent(exc: httpx.TransportError) -> bool:
    """True when the request certainly never left this machine (safe to send again)."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def transport_error(exc: httpx.TransportError, url: str, *, idempotent: bool) -> NetworkError:
    host = urlsplit(url).netloc
    reason = describe_transport_error(exc)
    if idempotent or not_sent(exc):
        return NetworkError(
            f"Could not reach CometAPI at {host} ({reason}).",
            hint="Check the internet connection and COMETAPI_BASE_URL, then try again.",
        )
    if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
        return NetworkError(
            f"The connection to {host} broke while the request was being sent ({reason}).",
            hint="CometAPI most likely did not get all of it; try again. If unsure, check the jobs list first.",
        )
    return NetworkError(f"CometAPI at {host} did not answer ({reason}).", hint=MAYBE_RECEIVED_HINT)


# --------------------------------------------------------------------------- API answers


def unavailable(method: str, path: str, why: str, *, page_repeated: bool = True,
                idempotent: bool = True) -> ProviderError:
    """The error for an answer that shows ``path`` is not served.

    A web page instead of the API (``page_repeated`` False: the route's previous answer was not a
    web page too) is most often a passing fault of the service's gateway: the next call works. Only
    a repeated page says a model route may be gone. Fine-tune routes say so at once: CometAPI lists
    fine-tuning as unavailable, and its hint already says to try again later."""
    if "finetune" in path.rsplit("/", 1)[-1]:
        return EndpointUnavailableError(
            f"CometAPI answered as if the fine-tuning endpoint {method} {path} does not exist or is "
            f"switched off ({why}).",
            hint=_FINETUNE_UNAVAILABLE_HINT,
        )
    if not page_repeated:
        return ServerError(
            f"CometAPI answered {method} {path} with {why}, most likely a passing fault of its gateway.",
            hint="Wait a moment and try again." if idempotent else f"Try again. {MAYBE_RECEIVED_HINT}",
        )
    return EndpointUnavailableError(
        f"CometAPI answered as if {method} {path} does not exist or is unavailable ({why}).",
        hint="Check COMETAPI_BASE_URL (normally https://api.cometapi.com) and the model name; "
        "the service may have retired this model.",
    )


def api_error(
    response: httpx.Response, method: str, path: str, *, idempotent: bool, not_found: str | None,
    clean: Callable[[str], str], page_repeated: bool = True,
) -> ProviderError:
    """The error for a non-2xx API answer. ``not_found``: the message for an id-specific 404;
    ``page_repeated``: the route's previous answer was a web page too (see ``unavailable``)."""
    status = response.status_code
    body = json_or_none(response)
    message, param, code = _server_text(body)
    message = clean(message)
    said = f": {message}" if message else ""

    if status in (301, 302, 303, 307, 308):
        target = urlsplit(response.headers.get("location", "")).netloc or "another address"
        return unavailable(method, path, f"a redirect (HTTP {status}) to {target}")
    if status == 401:
        return AuthError(
            f"CometAPI did not accept the API key (HTTP 401{said}).",
            hint="Check COMETAPI_KEY or the key you entered; copy it again from your CometAPI dashboard.",
        )
    if status == 403:
        return AuthError(
            f"CometAPI refused this request (HTTP 403{said}).",
            hint="The key may not be allowed to use this model or endpoint; check it on your CometAPI dashboard.",
        )
    if status == 402:
        return InsufficientCreditsError(
            f"Your CometAPI account has no credits left (HTTP 402{said}).",
            hint="Add credits on cometapi.com, then try again.",
        )
    if status == 429:
        retry_after = _parse_retry_after(response.headers.get("retry-after"), body)
        seconds = math.ceil(retry_after) if retry_after else 0
        wait = (f"Wait {seconds} second{'' if seconds == 1 else 's'} and try again." if seconds
                else "Wait a minute and try again.")
        return RateLimitedError(
            f"CometAPI is limiting how fast requests may be sent (HTTP 429{said}).",
            hint=f"{wait} Running fewer jobs at once helps.",
            retry_after=retry_after,
        )
    if status in (400, 422):
        fields = _detail_fields(body["detail"]) if isinstance(body, dict) and isinstance(body.get("detail"), list) else {}
        if not fields and param:
            fields = {param: message or "is not valid"}
        summary = "; ".join(f"{k}: {v}" for k, v in fields.items()) or message or "no reason given"
        return ValidationError(
            f"CometAPI rejected the request (HTTP {status}): {clean(summary)}.",
            hint="Fix the named settings and try again.",
            fields={k: clean(v) for k, v in fields.items()},
        )
    if status == 413:
        return ValidationError(
            f"The request is too large for CometAPI (HTTP 413{said}).",
            hint="Use fewer or smaller images in the dataset.",
            fields={"file_data": "too large"},
        )
    if status == 404:
        # A route that is missing says just "Not Found" / "Invalid URL"; an unknown id says more
        # (e.g. "Finetune abc not found", or BFL's {"status": "Task not found"}).
        specific = message or (str(body.get("status") or "") if isinstance(body, dict) else "")
        if not_found and not is_html(response) and specific and not _GENERIC_NOT_FOUND.match(specific):
            return TaskNotFoundError(not_found, hint="It may have expired, been deleted, or belong to another key; refresh the list.")
        if is_html(response):
            return unavailable(method, path, "HTTP 404 with a web page", page_repeated=page_repeated,
                               idempotent=idempotent)
        return unavailable(method, path, "HTTP 404")
    if status == 405:
        return unavailable(method, path, "HTTP 405 method not allowed")
    if status >= 500 and code == "invalid_request":
        # The contract: a 500 with this code is a rejected request; sending it again fails the same way.
        return ValidationError(
            f"CometAPI rejected the request as invalid (HTTP {status}{said}).",
            hint="Change the settings of this request; sending it again unchanged will fail the same way.",
            fields={param: message} if param else {},
        )
    if status >= 500 and code == "model_not_found":
        # one-api style "no channel serves this model": switched off, not a passing fault.
        return unavailable(method, path, f"HTTP {status}: no provider serves this model{said}")
    if status >= 500:
        kind = "its gateway timed out" if status in (504, 524) else "it had a server error"
        hint = "Wait a minute and try again." if idempotent else MAYBE_RECEIVED_HINT
        return ServerError(f"CometAPI could not answer: {kind} (HTTP {status}{said}).", hint=hint)
    return ProviderError(
        f"CometAPI answered HTTP {status} to {method} {path}{said}.",
        hint="Try again; if it keeps happening, check COMETAPI_BASE_URL.",
    )


# --------------------------------------------------------------------------- result links


def download_error(response: httpx.Response) -> ProviderError:
    """The error for a non-2xx answer from a result link (a signed URL on a storage host)."""
    status = response.status_code
    if status in (401, 403, 404, 410):
        return ResultExpiredError(
            f"The result link has expired or is no longer valid (HTTP {status}).",
            hint="Result links last about 10 minutes. Generate the image again.",
        )
    if status == 429:
        retry_after = _parse_retry_after(response.headers.get("retry-after"), None)
        return RateLimitedError(
            "The result server is limiting downloads (HTTP 429).", hint="Wait a moment and try again.", retry_after=retry_after
        )
    if status >= 500:
        return ServerError(f"The result server had an error (HTTP {status}).", hint="Try the download again in a moment.")
    return ProviderError(f"The result link answered HTTP {status}.", hint="Generate the image again.")
