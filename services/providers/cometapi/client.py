"""The CometAPI client: FLUX fine-tuning, generation, polling, downloads and chat captioning.

It talks to CometAPI over HTTP and nothing else (no gradio, no job store). Every failure is
raised as a ``services.errors`` class with a message that says what went wrong and what to do.
The contract it follows is ``/work/shared/cometapi-contract.md``.

Design notes (the *why*):

* The API key is a ``Secret``. It is revealed in exactly one place (``_auth_headers``), is
  never put in the ``httpx.Client`` default headers (so nothing that dumps the client shows
  it), and any text quoted from a server answer is scrubbed of it before it reaches a message.
* The dataset zip is sent as base64 *inside* a JSON body. A 500 MB zip would be a 670 MB
  string, so the body is streamed: JSON prefix, base64 of file blocks (block size a multiple
  of 3, so the pieces concatenate into one valid base64 string), JSON suffix, with the
  Content-Length computed up front (no chunked encoding, which some gateways refuse).
* GETs (reads, polls, downloads) are retried with exponential backoff and jitter on 429, 5xx,
  timeouts and broken connections. A POST that may have reached the server (submit a
  fine-tune, generate, delete) is only re-sent when the connection failed *before* anything
  was sent; otherwise the error says the request may have been received, because sending it
  again could start (and bill) the same job twice.
* Redirects are not followed: CometAPI answers some unknown paths with 301 or an HTML page
  instead of a JSON 404, and that is how "this endpoint is switched off" shows itself.
* ``sleep``, ``clock`` and ``rand`` are injectable so tests run fast and deterministically.
"""
from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from services.storage import atomic
from services.config import Secret
from services.errors import (
    AuthError,
    ConfigError,
    EndpointUnavailableError,
    InputError,
    InsufficientCreditsError,
    ModeratedError,
    NetworkError,
    ProviderError,
    RateLimitedError,
    ResultExpiredError,
    ServerError,
    TaskNotFoundError,
    ValidationError,
    WaitTimeoutError,
)

if TYPE_CHECKING:  # only for the type hint
    from services.config import Settings

__all__ = [
    "BASE_MODEL_FOR",
    "FINETUNED_MODELS",
    "FINETUNE_MODES",
    "FINETUNE_TYPES",
    "LORA_RANKS",
    "PRIORITIES",
    "CometAPIClient",
    "FinetuneDetails",
    "TaskResult",
    "TaskStatus",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- contract values

FINETUNE_MODES: tuple[str, ...] = ("general", "character", "style", "product")
FINETUNE_TYPES: tuple[str, ...] = ("full", "lora")
PRIORITIES: tuple[str, ...] = ("quality", "speed", "high_res_only")
LORA_RANKS: tuple[int, ...] = (16, 32)
ITERATIONS_RANGE = (100, 1000)
LEARNING_RATE_RANGE = (1e-6, 5e-3)
FINETUNE_STRENGTH_RANGE = (0.0, 2.0)

FINETUNED_MODELS: frozenset[str] = frozenset({"flux-pro-1.1-ultra-finetuned", "flux-pro-finetuned"})
# The base model to compare a fine-tune against (contract: "Inference with a fine-tune").
BASE_MODEL_FOR: Mapping[str, str] = {
    "flux-pro-1.1-ultra-finetuned": "flux-pro-1.1-ultra",
    "flux-pro-finetuned": "flux-pro-1.1",
}


class TaskStatus:
    """The ``status`` strings ``get_result`` answers with (exactly as the service spells them)."""

    PENDING = "Pending"
    READY = "Ready"
    ERROR = "Error"
    NOT_FOUND = "Task not found"
    REQUEST_MODERATED = "Request Moderated"
    CONTENT_MODERATED = "Content Moderated"

    TERMINAL: frozenset[str] = frozenset({READY, ERROR, NOT_FOUND, REQUEST_MODERATED, CONTENT_MODERATED})


# --------------------------------------------------------------------------- timeouts & limits

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=60.0, write=60.0, pool=10.0)
# Uploading a few hundred MB of base64 takes minutes on a home line, and the server may take
# a while to decode it before answering.
UPLOAD_TIMEOUT = httpx.Timeout(connect=10.0, read=180.0, write=900.0, pool=10.0)
# Raw bytes per block of the streamed upload. Must be a multiple of 3: base64 of each block then
# has no padding, so the encoded blocks join into one valid base64 string.
UPLOAD_BLOCK = 3 * 64 * 1024
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")
_USER_AGENT = "flux-finetune-studio/1.0"
# Texts a JSON 404 carries when the *route* is missing (FastAPI / one-api style), as opposed
# to "this id does not exist".
_GENERIC_NOT_FOUND = re.compile(r"^\s*(not found|invalid url\b.*|page not found|404.*)\s*$", re.I | re.S)

# Hint shared by every answer that shows fine-tuning is switched off upstream.
_FINETUNE_UNAVAILABLE_HINT = (
    "CometAPI lists FLUX fine-tuning as \"temporarily unavailable\" (Black Forest Labs retired "
    "its fine-tuning API). Use the Local engine to train and generate instead, or try CometAPI "
    "again later."
)
_MAYBE_RECEIVED_HINT = (
    "The request may have reached CometAPI. Check the jobs list (for fine-tunes: refresh "
    "\"My fine-tunes\") before trying again, so the same job is not started and charged twice."
)

ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TaskResult:
    """One answer from ``GET /flux/v1/get_result``.

    ``progress`` is passed on as the service sent it (None when it did not say); the docs do
    not say whether it is 0-1 or 0-100, so use ``progress_fraction`` to show it.
    """

    id: str
    status: str
    progress: float | None = None
    sample_url: str | None = None
    seed: int | None = None
    prompt: str | None = None
    duration: float | None = None
    message: str | None = None
    details: Any = None
    preview: Any = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_ready(self) -> bool:
        return self.status == TaskStatus.READY

    @property
    def is_terminal(self) -> bool:
        return self.status in TaskStatus.TERMINAL

    @property
    def progress_fraction(self) -> float | None:
        """Progress in 0..1 whichever scale the service used (values above 1 are percent)."""
        if self.progress is None:
            return None
        value = self.progress / 100.0 if self.progress > 1.0 else self.progress
        return min(1.0, max(0.0, value))


@dataclass(frozen=True)
class FinetuneDetails:
    """``GET /flux/v1/finetune_details``. Missing fields are None; ``raw`` holds everything."""

    finetune_id: str
    comment: str | None = None
    trigger_word: str | None = None
    mode: str | None = None
    finetune_type: str | None = None
    lora_rank: int | None = None
    iterations: int | None = None
    learning_rate: float | None = None
    priority: str | None = None
    timestamp: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- small helpers


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    number = _as_float(value)
    return int(number) if number is not None and number == int(number) else None


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _is_html(response: httpx.Response) -> bool:
    ctype = response.headers.get("content-type", "").lower()
    return "html" in ctype or response.content.lstrip()[:1] == b"<"


def _json_or_none(response: httpx.Response) -> Any:
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


def _parse_retry_after(value: str | None, body: Any) -> float | None:
    """Seconds to wait, from a Retry-After header (seconds or HTTP date) or BFL's body field."""
    if value:
        value = value.strip()
        number = _as_float(value)
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
        number = _as_float(body.get("retry_after"))
        if number is not None:
            return max(0.0, number)
    return None


def _is_finetune_route(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return "finetune" in name


def _describe_transport_error(exc: httpx.TransportError) -> str:
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


def _not_sent(exc: httpx.TransportError) -> bool:
    """True when the request certainly never left this machine (safe to send again)."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


# --------------------------------------------------------------------------- the client


class CometAPIClient:
    """Client for CometAPI's FLUX (BFL-format) and OpenAI-compatible chat endpoints.

    Thread-safe: one client can serve every Gradio worker thread. Use as a context manager or
    call ``close()``.
    """

    def __init__(
        self,
        base_url: str,
        api_key: Secret | str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        upload_timeout: httpx.Timeout = UPLOAD_TIMEOUT,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        max_retry_after: float = 120.0,
        poll_initial: float = 1.0,
        poll_factor: float = 1.5,
        poll_max: float = 10.0,
    ) -> None:
        self.base_url = self._check_base_url(base_url)
        self._key = api_key if isinstance(api_key, Secret) else Secret(api_key)
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._timeout = timeout
        self._upload_timeout = upload_timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_retry_after = max_retry_after
        self._poll_initial = poll_initial
        self._poll_factor = poll_factor
        self._poll_max = poll_max
        # No auth in the default headers on purpose: see the module notes.
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            headers={"User-Agent": _USER_AGENT, "Accept": "application/json"},
        )

    @classmethod
    def from_settings(cls, settings: Settings, transport: httpx.BaseTransport | None = None, **kw: Any) -> CometAPIClient:
        return cls(settings.cometapi_base_url, settings.cometapi_key, transport=transport, **kw)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CometAPIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CometAPIClient(base_url={self.base_url!r}, api_key={'set' if self._key else 'missing'})"

    __str__ = __repr__

    def __reduce__(self):  # pickling would copy the key
        raise TypeError("CometAPIClient cannot be pickled")

    @property
    def has_key(self) -> bool:
        return bool(self._key)

    # ----------------------------------------------------------------- fine-tuning

    def submit_finetune(
        self,
        zip_path: Path | str,
        *,
        comment: str,
        mode: str,
        trigger_word: str = "TOK",
        iterations: int = 300,
        learning_rate: float | None = None,
        captioning: bool = True,
        priority: str = "quality",
        finetune_type: str = "full",
        lora_rank: int = 32,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        on_upload_progress: ProgressCallback | None = None,
    ) -> str:
        """Upload the dataset zip and start a fine-tune. Returns the fine-tune id.

        ``on_upload_progress(bytes_sent, total_bytes)`` is called as the body goes out; it may
        raise to abort the upload. Never re-sent after the body may have arrived.
        """
        zip_path = Path(zip_path)
        fields = {
            "finetune_comment": comment,
            "mode": mode,
            "trigger_word": trigger_word,
            "iterations": iterations,
            "learning_rate": learning_rate,
            "captioning": captioning,
            "priority": priority,
            "finetune_type": finetune_type,
            "lora_rank": lora_rank,
            "webhook_url": webhook_url,
            "webhook_secret": webhook_secret,
        }
        self._check_finetune_fields(fields)
        try:
            size = zip_path.stat().st_size
        except OSError:
            raise InputError(
                f"The dataset zip '{zip_path.name}' could not be read.", hint="Export the dataset again, then retry."
            ) from None
        if size == 0:
            raise InputError(f"The dataset zip '{zip_path.name}' is empty.", hint="Export the dataset again, then retry.")
        body = _StreamedFinetuneBody(zip_path, size, {k: v for k, v in fields.items() if v is not None})
        data = self._request(
            "POST",
            "/flux/v1/finetune",
            idempotent=False,
            content_factory=lambda: body.iterate(on_upload_progress),
            headers={"Content-Type": "application/json", "Content-Length": str(body.length)},
            timeout=self._upload_timeout,
        )
        finetune_id = (data.get("finetune_id") or data.get("id")) if isinstance(data, dict) else None
        if not finetune_id:
            raise ProviderError(
                "CometAPI accepted the dataset but did not say which fine-tune it started.",
                hint=_MAYBE_RECEIVED_HINT,
            )
        return str(finetune_id)

    def finetune_details(self, finetune_id: str) -> FinetuneDetails:
        self._check_id(finetune_id, "finetune_id")
        data = self._request(
            "GET",
            "/flux/v1/finetune_details",
            params={"finetune_id": finetune_id},
            idempotent=True,
            not_found=f"CometAPI does not know fine-tune '{finetune_id}'.",
        )
        info = data.get("finetune_details", data) if isinstance(data, dict) else {}
        info = info if isinstance(info, dict) else {}
        return FinetuneDetails(
            finetune_id=finetune_id,
            comment=_as_str(info.get("finetune_comment")),
            trigger_word=_as_str(info.get("trigger_word")),
            mode=_as_str(info.get("mode")),
            finetune_type=_as_str(info.get("finetune_type")),
            lora_rank=_as_int(info.get("lora_rank")),
            iterations=_as_int(info.get("iterations")),
            learning_rate=_as_float(info.get("learning_rate")),
            priority=_as_str(info.get("priority")),
            timestamp=_as_str(info.get("timestamp")),
            raw=info,
        )

    def list_finetunes(self) -> list[str]:
        data = self._request("GET", "/flux/v1/my_finetunes", idempotent=True)
        items = data.get("finetunes", []) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ProviderError("CometAPI sent a fine-tune list this app cannot read.", hint="Try again later.")
        # Tolerate a list of objects as well as the documented list of ids.
        ids = [str(i.get("finetune_id") or i.get("id")) if isinstance(i, dict) else str(i) for i in items]
        return [i for i in ids if i and i != "None"]

    def delete_finetune(self, finetune_id: str) -> dict[str, Any]:
        self._check_id(finetune_id, "finetune_id")
        data = self._request(
            "POST",
            "/flux/v1/delete_finetune",
            json_body={"finetune_id": finetune_id},
            idempotent=False,
            not_found=f"CometAPI does not know fine-tune '{finetune_id}' (already deleted?).",
        )
        return data if isinstance(data, dict) else {"result": data}

    # ----------------------------------------------------------------- generation

    def generate(self, model: str, **params: Any) -> str:
        """Start an image with a base model (``POST /flux/v1/{model}``). Returns the task id."""
        if not isinstance(model, str) or not _MODEL_RE.match(model):
            raise ValidationError(
                f"'{model}' is not a FLUX model name.", hint="Pick a model such as flux-pro-1.1.", fields={"model": "unknown model"}
            )
        body = {k: v for k, v in params.items() if v is not None}
        data = self._request("POST", f"/flux/v1/{model}", json_body=body, idempotent=False)
        task_id = data.get("id") if isinstance(data, dict) else None
        if not task_id:
            raise ProviderError("CometAPI accepted the request but sent no task id.", hint=_MAYBE_RECEIVED_HINT)
        return str(task_id)

    def generate_finetuned(self, model: str, finetune_id: str, finetune_strength: float, **params: Any) -> str:
        """Start an image with a fine-tune (``flux-pro-1.1-ultra-finetuned`` / ``flux-pro-finetuned``)."""
        if model not in FINETUNED_MODELS:
            raise ValidationError(
                f"'{model}' cannot use a fine-tune.",
                hint=f"Use one of: {', '.join(sorted(FINETUNED_MODELS))}.",
                fields={"model": "not a fine-tuned model"},
            )
        self._check_id(finetune_id, "finetune_id")
        strength = _as_float(finetune_strength)
        low, high = FINETUNE_STRENGTH_RANGE
        if strength is None or not low <= strength <= high:
            raise ValidationError(
                f"Fine-tune strength must be between {low:g} and {high:g}, got {finetune_strength!r}.",
                hint="Start around 1.1-1.2; go up to ~1.4 if the concept is missing, lower it on artifacts.",
                fields={"finetune_strength": f"must be between {low:g} and {high:g}"},
            )
        return self.generate(model, finetune_id=finetune_id, finetune_strength=strength, **params)

    # ----------------------------------------------------------------- polling

    def get_result(self, task_id: str) -> TaskResult:
        """One poll. Returns whatever status the task has; see ``wait`` for raising on failures."""
        self._check_id(task_id, "id")
        try:
            data = self._request(
                "GET", "/flux/v1/get_result", params={"id": task_id}, idempotent=True, not_found="unknown task"
            )
        except TaskNotFoundError:  # some deployments answer an unknown id with a JSON 404
            return TaskResult(id=task_id, status=TaskStatus.NOT_FOUND)
        if not isinstance(data, dict) or not data.get("status"):
            raise ProviderError("CometAPI sent a task status this app cannot read.", hint="Try again in a moment.")
        return _task_result(task_id, data)

    def wait(
        self,
        task_id: str,
        *,
        timeout: float = 600.0,
        on_progress: Callable[[TaskResult], None] | None = None,
    ) -> TaskResult:
        """Poll until the task is Ready and return it; raise on any other final state.

        Polls start every ``poll_initial`` seconds and slow down (x``poll_factor``, up to
        ``poll_max``) with jitter, so many waiting jobs do not poll in lockstep. Passing faults
        (network, 5xx, 429) are ridden out until ``timeout``; then the last one is raised.
        """
        deadline = self._clock() + timeout
        delay = self._poll_initial
        while True:
            pause = delay * (0.8 + 0.4 * self._rand())
            try:
                result = self.get_result(task_id)
            except ProviderError as exc:
                # get_result already retried a few times. A long wait (fine-tunes take a while)
                # should outlast a short outage, so keep polling until the deadline.
                if not exc.retryable or self._clock() >= deadline:
                    raise
                log.warning("CometAPI poll of %s failed (%s); polling again", task_id, exc.__class__.__name__)
                retry_after = getattr(exc, "retry_after", None) or 0.0
                self._sleep(min(max(pause, retry_after), max(0.0, deadline - self._clock())))
                delay = min(self._poll_max, delay * self._poll_factor)
                continue
            if on_progress is not None:
                on_progress(result)
            if result.is_ready:
                return result
            _raise_for_final(result)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise WaitTimeoutError(
                    f"Task '{task_id}' is still {result.status.lower() or 'running'} after {timeout:g} seconds.",
                    hint="It may still finish on the server: check it again later from the jobs list.",
                )
            self._sleep(min(remaining, pause))
            delay = min(self._poll_max, delay * self._poll_factor)

    # ----------------------------------------------------------------- downloads

    def download(self, url: str, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
        """Fetch a result image into memory (see ``download_to``, which streams it to a file)."""
        return b"".join(self._download_chunks(url, max_bytes))

    def download_to(self, url: str, path: Path | str, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
        """Stream a result image to ``path`` atomically: never a half-written file, never more than
        ``max_bytes`` read, whatever the server says its size is."""
        path = Path(path)
        with atomic.replacing(path) as tmp, open(tmp, "wb") as out:
            for chunk in self._download_chunks(url, max_bytes):
                out.write(chunk)
        return path

    def _download_chunks(self, url: str, max_bytes: int) -> Iterator[bytes]:
        """A result link's body, chunk by chunk, stopped past ``max_bytes``. Sample links expire
        after ~10 minutes: download at once. They are signed URLs on a storage host, which may
        redirect: downloads (only they) follow redirects, and never carry the API key."""
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError("The result link is not a web address.", hint="Generate the image again.")
        response = self._send("GET", url, idempotent=True, auth=False, headers={"Accept": "*/*"},
                              error_for=self._download_error, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise self._too_big(max_bytes)
            chunks = response.iter_bytes(1 << 16)
            first = next(chunks, b"")
            ctype = response.headers.get("content-type", "").lower()
            if "image" not in ctype and ("html" in ctype or first.lstrip()[:1] == b"<"):
                raise ResultExpiredError(
                    "The result link answered with a web page instead of an image; it has probably expired.",
                    hint="Result links last about 10 minutes. Generate the image again.",
                )
            received = 0
            for chunk in itertools.chain([first], chunks):
                received += len(chunk)
                if received > max_bytes:
                    raise self._too_big(max_bytes)
                yield chunk
        finally:
            response.close()

    @staticmethod
    def _too_big(max_bytes: int) -> ProviderError:
        return ProviderError(f"The result file is larger than {max_bytes // 2**20} MB; refusing to load it.",
                             hint="This is not a normal image result; generate again.")

    # ----------------------------------------------------------------- chat (captioning)

    def chat_completion(self, model: str, messages: list[dict[str, Any]], **kw: Any) -> str:
        """OpenAI-compatible chat completion; returns the assistant's text.

        Retried like a read: it starts no job and changes nothing on the account.
        """
        body = {"model": model, "messages": messages, **{k: v for k, v in kw.items() if v is not None}}
        data = self._request("POST", "/v1/chat/completions", json_body=body, idempotent=True)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ProviderError(
                f"The captioning model '{model}' sent no answer.", hint="Try again, or pick another caption model."
            ) from None
        if isinstance(content, list):  # some providers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise ProviderError(
                f"The captioning model '{model}' sent an empty answer.", hint="Try again, or pick another caption model."
            )
        return content.strip()

    # ================================================================= internals

    @staticmethod
    def _check_base_url(base_url: str) -> str:
        base_url = (base_url or "").strip().rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"COMETAPI_BASE_URL must be a web address such as https://api.cometapi.com, got {base_url!r}.",
                hint="Fix or unset it.",
            )
        return base_url

    @staticmethod
    def _check_id(value: str, name: str) -> None:
        if not isinstance(value, str) or not value.strip():
            raise ValidationError(f"No {name} was given.", hint="Pick a job first.", fields={name: "required"})

    @staticmethod
    def _check_finetune_fields(f: Mapping[str, Any]) -> None:
        """Check what the contract fixes before uploading hundreds of MB only to get a 422."""
        errors: dict[str, str] = {}
        if not str(f["finetune_comment"] or "").strip():
            errors["finetune_comment"] = "give the fine-tune a name"
        if f["mode"] not in FINETUNE_MODES:
            errors["mode"] = f"must be one of {', '.join(FINETUNE_MODES)}"
        if not str(f["trigger_word"] or "").strip():
            errors["trigger_word"] = "must not be empty"
        iterations = f["iterations"]
        if isinstance(iterations, bool) or not isinstance(iterations, int) or not (
            ITERATIONS_RANGE[0] <= iterations <= ITERATIONS_RANGE[1]
        ):
            errors["iterations"] = f"must be a whole number from {ITERATIONS_RANGE[0]} to {ITERATIONS_RANGE[1]}"
        lr = f["learning_rate"]
        if lr is not None and (_as_float(lr) is None or not LEARNING_RATE_RANGE[0] <= float(lr) <= LEARNING_RATE_RANGE[1]):
            errors["learning_rate"] = f"must be between {LEARNING_RATE_RANGE[0]:g} and {LEARNING_RATE_RANGE[1]:g}, or empty"
        if f["priority"] not in PRIORITIES:
            errors["priority"] = f"must be one of {', '.join(PRIORITIES)}"
        if f["finetune_type"] not in FINETUNE_TYPES:
            errors["finetune_type"] = f"must be one of {', '.join(FINETUNE_TYPES)}"
        if f["lora_rank"] not in LORA_RANKS:
            errors["lora_rank"] = "must be 16 or 32"
        if errors:
            summary = "; ".join(f"{k}: {v}" for k, v in errors.items())
            raise ValidationError(f"The fine-tune settings are not valid: {summary}.", hint="Fix them and submit again.", fields=errors)

    def _auth_headers(self) -> dict[str, str]:
        if not self._key:
            raise AuthError(
                "No CometAPI key is set. Set COMETAPI_KEY or enter a key in the app's settings.",
                hint="Get a key from your CometAPI dashboard (cometapi.com).",
            )
        return {"Authorization": f"Bearer {self._key.reveal()}"}  # the one place the key is revealed

    def _clean(self, text: str, limit: int = 300) -> str:
        """Server text made safe for a message: no key, one line, bounded length."""
        text = " ".join(str(text).split())
        key = self._key.reveal()
        if key:
            text = text.replace(key, "[key hidden]")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with 'equal jitter': half fixed, half random."""
        delay = min(self._backoff_cap, self._backoff_base * 2 ** (attempt - 1))
        return delay * (0.5 + 0.5 * self._rand())

    # ----------------------------------------------------------------- send + retry

    def _request(
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
        """Call an API endpoint and return its JSON. ``not_found``: message for an id-specific 404."""
        url = self.base_url + path
        response = self._send(
            method,
            url,
            idempotent=idempotent,
            params=params,
            json_body=json_body,
            content_factory=content_factory,
            headers=headers,
            timeout=timeout,
            error_for=lambda r: self._api_error(r, method, path, idempotent=idempotent, not_found=not_found),
        )
        if not response.content.strip():
            return {}
        data = _json_or_none(response)
        if data is None:  # HTML or garbage on a 2xx: a proxy or a landing page, not the API
            what = "a web page" if _is_html(response) else "a response that is not JSON"
            raise self._unavailable(method, path, f"HTTP {response.status_code} with {what} instead of JSON")
        return data

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
                error = self._transport_error(exc, url, idempotent=idempotent)
                if (idempotent or _not_sent(exc)) and attempt < self._max_attempts:
                    delay = self._backoff(attempt)
                    log.warning("CometAPI %s: %s; retrying in %.1f s (attempt %d/%d)", what,
                                _describe_transport_error(exc), delay, attempt + 1, self._max_attempts)
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

    # ----------------------------------------------------------------- error mapping

    def _transport_error(self, exc: httpx.TransportError, url: str, *, idempotent: bool) -> NetworkError:
        host = urlsplit(url).netloc
        reason = _describe_transport_error(exc)
        if idempotent or _not_sent(exc):
            return NetworkError(
                f"Could not reach CometAPI at {host} ({reason}).",
                hint="Check the internet connection and COMETAPI_BASE_URL, then try again.",
            )
        if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)):
            return NetworkError(
                f"The connection to {host} broke while the request was being sent ({reason}).",
                hint="CometAPI most likely did not get all of it; try again. If unsure, check the jobs list first.",
            )
        return NetworkError(f"CometAPI at {host} did not answer ({reason}).", hint=_MAYBE_RECEIVED_HINT)

    def _unavailable(self, method: str, path: str, why: str) -> EndpointUnavailableError:
        if _is_finetune_route(path):
            return EndpointUnavailableError(
                f"CometAPI answered as if the fine-tuning endpoint {method} {path} does not exist or is "
                f"switched off ({why}).",
                hint=_FINETUNE_UNAVAILABLE_HINT,
            )
        return EndpointUnavailableError(
            f"CometAPI answered as if {method} {path} does not exist or is unavailable ({why}).",
            hint="Check COMETAPI_BASE_URL (normally https://api.cometapi.com) and the model name; "
            "the service may have retired this model.",
        )

    def _api_error(
        self, response: httpx.Response, method: str, path: str, *, idempotent: bool, not_found: str | None
    ) -> ProviderError:
        status = response.status_code
        body = _json_or_none(response)
        message, param, code = _server_text(body)
        message = self._clean(message)
        said = f": {message}" if message else ""

        if status in (301, 302, 303, 307, 308):
            target = urlsplit(response.headers.get("location", "")).netloc or "another address"
            return self._unavailable(method, path, f"a redirect (HTTP {status}) to {target}")
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
                f"CometAPI rejected the request (HTTP {status}): {self._clean(summary)}.",
                hint="Fix the named settings and try again.",
                fields={k: self._clean(v) for k, v in fields.items()},
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
            if not_found and not _is_html(response) and specific and not _GENERIC_NOT_FOUND.match(specific):
                return TaskNotFoundError(not_found, hint="It may have expired, been deleted, or belong to another key; refresh the list.")
            return self._unavailable(method, path, "HTTP 404" + (" with a web page" if _is_html(response) else ""))
        if status == 405:
            return self._unavailable(method, path, "HTTP 405 method not allowed")
        if status >= 500 and code == "invalid_request":
            # The contract: a 500 with this code is a rejected request; sending it again fails the same way.
            return ValidationError(
                f"CometAPI rejected the request as invalid (HTTP {status}{said}).",
                hint="Change the settings of this request; sending it again unchanged will fail the same way.",
                fields={param: message} if param else {},
            )
        if status >= 500 and code == "model_not_found":
            # one-api style "no channel serves this model": switched off, not a passing fault.
            return self._unavailable(method, path, f"HTTP {status}: no provider serves this model{said}")
        if status >= 500:
            kind = "its gateway timed out" if status in (504, 524) else "it had a server error"
            hint = "Wait a minute and try again." if idempotent else _MAYBE_RECEIVED_HINT
            return ServerError(f"CometAPI could not answer: {kind} (HTTP {status}{said}).", hint=hint)
        return ProviderError(
            f"CometAPI answered HTTP {status} to {method} {path}{said}.",
            hint="Try again; if it keeps happening, check COMETAPI_BASE_URL.",
        )

    def _download_error(self, response: httpx.Response) -> ProviderError:
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


# --------------------------------------------------------------------------- results parsing


def _task_result(task_id: str, data: Mapping[str, Any]) -> TaskResult:
    result = data.get("result")
    res = result if isinstance(result, dict) else {}
    details = data.get("details")
    message = res.get("message") or data.get("message") or (result if isinstance(result, str) else None)
    if message is None and isinstance(details, dict):
        message = details.get("message") or details.get("error")
    return TaskResult(
        id=str(data.get("id") or task_id),
        status=str(data.get("status")),
        progress=_as_float(data.get("progress")),
        sample_url=_as_str(res.get("sample")),
        seed=_as_int(res.get("seed")),
        prompt=_as_str(res.get("prompt")),
        duration=_as_float(res.get("duration")),
        message=_as_str(message),
        details=details,
        preview=data.get("preview"),
        raw=dict(data),
    )


def _raise_for_final(result: TaskResult) -> None:
    """Turn a final non-Ready status into the matching error; return for still-running ones."""
    said = f": {' '.join(result.message.split())[:300]}" if result.message else ""
    if result.status == TaskStatus.REQUEST_MODERATED:
        raise ModeratedError(
            f"The safety filter blocked the request before it ran (Request Moderated){said}.",
            hint="Reword the prompt (or change the input image) and try again.",
            kind="request",
        )
    if result.status == TaskStatus.CONTENT_MODERATED:
        raise ModeratedError(
            f"The safety filter blocked the finished image (Content Moderated){said}.",
            hint="Try a different prompt or seed.",
            kind="content",
        )
    if result.status == TaskStatus.NOT_FOUND:
        raise TaskNotFoundError(
            f"CometAPI does not know task '{result.id}' (Task not found).",
            hint="Tasks are kept only for a limited time, or the id is wrong; start it again.",
        )
    if result.status == TaskStatus.ERROR:
        raise ProviderError(
            f"The task failed on the provider's side{said or ' (no reason given)'}.",
            hint="Try again; if it fails again, change the settings or the prompt.",
        )
    # Pending, or a status the docs do not list: keep waiting.


# --------------------------------------------------------------------------- streamed upload body


class _StreamedFinetuneBody:
    """The JSON body of ``POST /flux/v1/finetune`` with ``file_data`` streamed from disk.

    Layout: ``{"file_data":"`` + base64(zip) + ``",`` + the other fields + ``}``. Only one
    block of the file is in memory at a time.
    """

    def __init__(self, zip_path: Path, size: int, fields: Mapping[str, Any]) -> None:
        self.zip_path = zip_path
        self.size = size
        self.prefix = b'{"file_data":"'
        rest = json.dumps(dict(fields), ensure_ascii=True, separators=(",", ":"))
        self.suffix = b'"' + (b"," + rest[1:].encode("ascii") if fields else b"}")
        self.length = len(self.prefix) + 4 * math.ceil(size / 3) + len(self.suffix)

    def iterate(self, on_progress: ProgressCallback | None) -> Iterator[bytes]:
        sent = 0

        def report(chunk: bytes) -> None:
            nonlocal sent
            sent += len(chunk)
            if on_progress is not None:
                on_progress(sent, self.length)

        if on_progress is not None:
            on_progress(0, self.length)
        yield self.prefix
        report(self.prefix)
        read = 0
        with open(self.zip_path, "rb") as fh:
            while block := fh.read(UPLOAD_BLOCK):
                read += len(block)
                if read > self.size:
                    break
                chunk = base64.b64encode(block)
                yield chunk
                report(chunk)
        if read != self.size:
            # The Content-Length is already on the wire; a changed file cannot be sent correctly.
            raise InputError(
                f"The dataset zip '{self.zip_path.name}' changed while it was being uploaded.",
                hint="Wait until the export has finished, then submit again.",
            )
        yield self.suffix
        report(self.suffix)
