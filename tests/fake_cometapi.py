"""A fake CometAPI that follows ``/work/shared/cometapi-contract.md``, served over real HTTP.

It is written from the contract, not from the client, so the client is tested against what
the real service does. It imports nothing from ``services``.

In tests::

    with FakeCometAPI(api_key="test-key", pending_polls=1) as fake:
        client = CometAPIClient(fake.url, Secret("test-key"))
        fake.fail_next("/flux/v1/get_result", status=429, headers={"Retry-After": "1"}, times=2)
        ...
        assert len(fake.requests("/flux/v1/finetune")) == 1

By hand (then point the app at it with COMETAPI_BASE_URL=http://127.0.0.1:8765)::

    python -m tests.fake_cometapi --port 8765 --key test-key [--finetune-unavailable 404]

What it does:

* Bearer auth against ``api_key`` (401 envelope otherwise). Sample images need no auth
  (they are signed URLs on a storage host in the real service).
* Every contract route. Jobs answer ``Pending`` for ``pending_polls`` polls (progress rising,
  0..1; fine-tunes say ``null`` on their first poll), then ``Ready``.
* Sample images are real JPEGs whose colour comes from prompt + seed, blended towards a colour
  of the fine-tune by ``finetune_strength`` (so base and tuned images differ). Links expire
  (403) ``sample_ttl`` seconds after the job became Ready, measured with the injectable ``clock``.
* Moderation: a prompt containing ``moderation_word`` -> ``Request Moderated``; seed
  ``content_moderation_seed`` -> ``Content Moderated``; a prompt containing ``error_word`` ->
  ``Error`` with ``result.message``.
* ``finetune_unavailable``: ``"404"`` (JSON 404 like one-api's "Invalid URL"), ``"301"``
  (redirect to the landing page), ``"html"`` (200 landing page) or ``"no_channel"`` (503,
  code model_not_found), for every fine-tune route, to simulate the current upstream state.
* Faults: ``fail_next`` (any status / headers / body), ``reset_next`` (drop the connection
  mid-answer), ``delay_next`` (answer late, e.g. past the client's timeout) and
  ``set_latency`` per route. A status fault answers *instead of* the route (nothing happens);
  ``reset_next`` and ``delay_next`` let the route run first, as when a request arrived and
  only the answer was lost.
* Records every request (method, path, query, headers without ``authorization``, JSON body
  with long strings elided, and for uploads the decoded zip's size / sha256 / image count).
* For a fake in another process (standalone, browser tests), unauthenticated control routes:
  ``GET /_fake/requests``, ``POST /_fake/reset``, ``POST /_fake/settings {"finetune_unavailable":
  "404", ...}`` and ``POST /_fake/fault {"action": "fail", "path": "/flux/v1/get_result",
  "status": 429, "headers": {"Retry-After": "1"}, "times": 2}`` (actions: fail, reset, delay).
* Thread-safe: state is behind one lock; the server runs on its own thread.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import colorsys
import hashlib
import io
import json
import logging
import math
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from PIL import Image, ImageDraw
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FINETUNE_MODES = {"general", "character", "style", "product"}
PRIORITIES = {"speed", "quality", "high_res_only"}
FINETUNE_TYPES = {"lora", "full"}
UNAVAILABLE_MODES = (None, "404", "301", "html", "no_channel")

# Per-model request rules. "size": width/height multiple of 32 in 256..1440 (default 1024x768);
# "aspect": aspect_ratio between 21:9 and 9:21 (default 16:9).
MODELS: dict[str, dict[str, Any]] = {
    "flux-dev": {"size": True, "steps": (1, 50), "guidance": (1.5, 5.0), "tolerance": 6},
    "flux-pro": {"size": True, "steps": (1, 50), "guidance": (1.5, 5.0), "tolerance": 6},
    "flux-pro-1.1": {"size": True, "tolerance": 6},
    "flux-pro-1.1-ultra": {"aspect": True, "tolerance": 6},
    "flux-kontext-pro": {"aspect": True, "tolerance": 6},
    "flux-2-pro": {"tolerance": 5, "webp": True},
    "flux-2-flex": {"steps": (1, 50), "tolerance": 5, "webp": True},
    "flux-pro-1.1-ultra-finetuned": {"aspect": True, "tolerance": 6, "finetune": (0.0, 2.0, 1.2)},
    "flux-pro-finetuned": {
        "size": True, "steps": (1, 50), "guidance": (1.5, 5.0), "tolerance": 6, "finetune": (0.0, 2.0, 1.1),
    },
}

LANDING_PAGE = (
    "<!doctype html><html><head><title>CometAPI</title></head><body><h1>CometAPI</h1>"
    "<p>All AI models in one API.</p></body></html>"
)


def _now_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _envelope(message: str, code: str = "", param: str = "", type_: str = "comet_api_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _default_fault_body(status: int, code: str | None) -> dict:
    """What the real service tends to answer with for a bare status."""
    if status == 429:
        return {"error": "rate_limit_exceeded", "message": "Too many concurrent requests", "retry_after": 5}
    if status == 402:
        return _envelope("Insufficient credits: your account balance is too low", "insufficient_user_quota")
    if status == 401:
        return _envelope("Invalid token", "invalid_api_key")
    if status == 403:
        return _envelope("This key is not allowed to use this model", "forbidden")
    if status == 404:
        return {"detail": "Not Found"}
    if code == "invalid_request" or (status == 500 and code is None):
        return _envelope("upstream rejected the request" if code else "internal server error", code or "")
    return _envelope(f"upstream error {status}", code or "upstream_error")


# --------------------------------------------------------------------------- records & faults


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names, never "authorization"
    json_keys: tuple[str, ...]
    json: Any  # the JSON body with long strings elided, or None
    body_bytes: int
    auth: str = "none"  # "none" | "ok" | "wrong": whether a key was sent, without keeping it
    extra: dict[str, Any] = field(default_factory=dict)
    status: int | None = None  # what the fake answered; None if it dropped the connection

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Fault:
    path: str  # exact path, or a prefix ending in "*"
    method: str | None
    action: str  # "respond" | "reset" | "delay"
    times: int
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    content_type: str = "application/json"
    delay: float = 0.0

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        return path.startswith(self.path[:-1]) if self.path.endswith("*") else path == self.path


@dataclass
class _Task:
    id: str
    kind: str  # "generate" | "finetune"
    pending_polls: int
    prompt: str = ""
    seed: int = 0
    model: str = ""
    width: int = 1024
    height: int = 768
    finetune_id: str | None = None
    strength: float = 0.0
    output_format: str = "jpeg"
    created: float = 0.0
    polls: int = 0
    status: str = "Pending"
    message: str | None = None
    ready_at: float | None = None
    sample_token: str | None = None


@dataclass
class _Sample:
    task_id: str
    issued: float
    content: bytes | None = None


# --------------------------------------------------------------------------- the fake


class FakeCometAPI:
    """The fake server. All knobs are plain attributes and may be changed while it runs."""

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        pending_polls: int = 2,
        finetune_pending_polls: int = 3,
        sample_ttl: float = 600.0,
        clock: Callable[[], float] = time.time,
        moderation_word: str = "forbidden",
        content_moderation_seed: int = 666,
        error_word: str = "explode",
        finetune_unavailable: str | None = None,
        min_images: int = 1,
        max_images: int = 20,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "critical",
    ) -> None:
        if finetune_unavailable not in UNAVAILABLE_MODES:
            raise ValueError(f"finetune_unavailable must be one of {UNAVAILABLE_MODES}")
        # Kept so reset() can put every knob back (one server can then serve a whole session).
        self._knobs: dict[str, Any] = {
            "api_key": api_key, "pending_polls": pending_polls, "finetune_pending_polls": finetune_pending_polls,
            "sample_ttl": sample_ttl, "clock": clock, "moderation_word": moderation_word,
            "content_moderation_seed": content_moderation_seed, "error_word": error_word,
            "finetune_unavailable": finetune_unavailable, "min_images": min_images, "max_images": max_images,
        }
        self.api_key = api_key
        self.pending_polls = pending_polls
        self.finetune_pending_polls = finetune_pending_polls
        self.sample_ttl = sample_ttl
        self.clock = clock
        self.moderation_word = moderation_word
        self.content_moderation_seed = content_moderation_seed
        self.error_word = error_word
        self.finetune_unavailable = finetune_unavailable
        self.min_images = min_images
        self.max_images = max_images
        self.host = host
        self._port = port
        self.log_level = log_level

        self._lock = threading.RLock()
        self._handled = threading.Condition(self._lock)  # notified when a request has run its route
        self._epoch = 0  # bumped by reset(); a request that outlives a reset changes nothing
        self._faults: list[_Fault] = []
        self._latency: dict[str, float] = {}
        self._records: list[RecordedRequest] = []
        self._tasks: dict[str, _Task] = {}
        self._finetunes: dict[str, dict[str, Any]] = {}
        self._samples: dict[str, _Sample] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeCometAPI:
        if self._thread is not None:
            return self
        # Bind ourselves so the port is known before the thread starts (port 0 = any free one).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        self._port = sock.getsockname()[1]
        self._socket = sock
        config = uvicorn.Config(
            self, log_config=None, log_level=self.log_level, lifespan="off",
            access_log=self.log_level in ("debug", "trace"),
            timeout_graceful_shutdown=1, timeout_keep_alive=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-cometapi", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the fake CometAPI server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeCometAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def reset(self) -> None:
        """Forget every job, record and fault and restore the constructor's knobs."""
        with self._lock:
            for name, value in self._knobs.items():
                setattr(self, name, value)
            self._epoch += 1
            self._faults.clear()
            self._latency.clear()
            self._records.clear()
            self._tasks.clear()
            self._finetunes.clear()
            self._samples.clear()

    # ----------------------------------------------------------------- faults & latency

    def fail_next(
        self,
        path: str,
        status: int = 500,
        *,
        times: int = 1,
        method: str | None = None,
        headers: dict[str, str] | None = None,
        json: Any = None,
        text: str | None = None,
        content_type: str | None = None,
        code: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with this status instead of the route.

        Body: ``json`` or ``text`` if given, else a realistic one for the status (``code`` sets
        the envelope's code, e.g. ``"invalid_request"``). ``text`` defaults to text/html.
        """
        if text is not None:
            body, ctype = text.encode(), content_type or "text/html; charset=utf-8"
        else:
            payload = json if json is not None else _default_fault_body(status, code)
            body, ctype = _json_bytes(payload), content_type or "application/json"
        self._add_fault(_Fault(path, method, "respond", times, status, dict(headers or {}), body, ctype))

    def reset_next(self, path: str, *, times: int = 1, method: str | None = None) -> None:
        """Run the route, then drop the connection half-way through the answer."""
        self._add_fault(_Fault(path, method, "reset", times))

    def delay_next(self, path: str, seconds: float, *, times: int = 1, method: str | None = None) -> None:
        """Wait ``seconds`` before running the route and answering (simulates a slow server)."""
        self._add_fault(_Fault(path, method, "delay", times, delay=seconds))

    def set_latency(self, path: str, seconds: float) -> None:
        """Delay every request to ``path`` (exact) by ``seconds``; 0 removes it."""
        with self._lock:
            if seconds > 0:
                self._latency[path] = seconds
            else:
                self._latency.pop(path, None)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._latency.clear()

    def _add_fault(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                    return fault
            return None

    # ----------------------------------------------------------------- inspection & seeding

    def requests(self, path: str | None = None, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self._records
                if (path is None or r.path == path) and (method is None or r.method == method.upper())
            ]

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()

    def finetune(self, finetune_id: str) -> dict[str, Any] | None:
        with self._lock:
            info = self._finetunes.get(finetune_id)
            return dict(info) if info else None

    def add_finetune(self, *, comment: str = "seeded", trigger_word: str = "TOK", ready: bool = True, **details: Any) -> str:
        """Create a fine-tune without uploading (e.g. to test generation). Returns its id."""
        finetune_id = uuid.uuid4().hex
        with self._lock:
            now = self.clock()
            self._finetunes[finetune_id] = {
                "finetune_comment": comment, "trigger_word": trigger_word, "mode": "general",
                "finetune_type": "full", "lora_rank": 32, "iterations": 300, "learning_rate": None,
                "priority": "quality", "captioning": True, "timestamp": _now_iso(now), **details,
            }
            self._tasks[finetune_id] = _Task(
                finetune_id, "finetune", 0, created=now, status="Ready" if ready else "Pending",
                ready_at=now if ready else None,
            )
        return finetune_id

    def set_status(self, task_id: str, status: str, message: str | None = None) -> None:
        """Force a task's final status (e.g. "Error" for a fine-tune that failed)."""
        with self._lock:
            task = self._tasks[task_id]
            task.status, task.message = status, message

    def wait_for_tasks(self, count: int, timeout: float = 30.0) -> bool:
        """Block until the fake knows ``count`` jobs (a request still on its way created them)."""
        with self._handled:
            return self._handled.wait_for(lambda: len(self._tasks) >= count, timeout)

    def task_ids(self) -> list[str]:
        """Every job (generation or fine-tune) the fake knows, oldest first."""
        with self._lock:
            return list(self._tasks)

    def task(self, task_id: str) -> dict[str, Any] | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return asdict(task) if task else None

    def release(self, task_id: str) -> None:
        """Let a pending job finish at its next poll (a test holds it pending until it is ready to watch)."""
        with self._lock:
            self._tasks[task_id].pending_polls = 0

    # ----------------------------------------------------------------- ASGI entry

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        with self._lock:
            arrived = self._epoch
        body = await _read_body(receive)
        method, path = scope["method"].upper(), scope["path"]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            stale = arrived != self._epoch
        if stale:  # an abandoned upload whose body ended after a reset belongs to an earlier test
            await JSONResponse(_envelope("the fake was reset"), 503)(scope, receive, send)
            return
        record = self._record(method, path, query, headers, body)
        record.extra["client_port"] = (scope.get("client") or ("", 0))[1]  # one port = one kept-alive connection

        fault = self._take_fault(method, path)
        with self._lock:
            latency = self._latency.get(path, 0.0)
            epoch = self._epoch
        if latency:
            await asyncio.sleep(latency)
        if fault is not None and fault.action == "delay":
            await asyncio.sleep(fault.delay)

        if epoch != self._epoch:  # reset() happened while this request slept: leave no trace
            response: Response = JSONResponse(_envelope("the fake was reset"), 503)
        elif fault is not None and fault.action == "respond":
            response = Response(fault.body, fault.status, fault.headers, media_type=fault.content_type)
        else:
            try:
                response = self._handle(method, path, query, headers, body, record)
            except Exception:  # a bug in the fake: say so loudly, answer 500
                log.exception("fake CometAPI failed on %s %s", method, path)
                response = JSONResponse(_envelope("fake server bug"), 500)

        if fault is not None and fault.action == "reset":
            # Promise a body, send a bit of it, then return: uvicorn closes the socket, and the
            # client sees the connection die mid-answer (httpx.RemoteProtocolError).
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
            await send({"type": "http.response.body", "body": b'{"id": ', "more_body": True})
            return
        with self._lock:
            record.status = response.status_code
            self._handled.notify_all()
        await response(scope, receive, send)

    def _record(self, method: str, path: str, query: dict, headers: dict, body: bytes) -> RecordedRequest:
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        record = RecordedRequest(
            method=method,
            path=path,
            query=query,
            headers={k: v for k, v in headers.items() if k != "authorization"},
            json_keys=tuple(parsed) if isinstance(parsed, dict) else (),
            json=_elide(parsed),
            body_bytes=len(body),
            auth=self._auth_state(headers),
        )
        with self._lock:
            self._records.append(record)
        return record

    def _auth_state(self, headers: dict[str, str]) -> str:
        value = headers.get("authorization")
        if value is None:
            return "none"
        return "ok" if value == f"Bearer {self.api_key}" else "wrong"

    # ----------------------------------------------------------------- routing

    def _handle(self, method: str, path: str, query: dict, headers: dict, body: bytes, record: RecordedRequest) -> Response:
        base = f"http://{headers.get('host', f'{self.host}:{self._port}')}"
        if path == "/" and method == "GET":
            return Response(LANDING_PAGE, 200, media_type="text/html")
        if path.startswith("/_fake/"):
            return self._admin(method, path, body)
        if path.startswith("/samples/") and method == "GET":
            return self._sample(path)

        if _is_finetune_route(path) and self.finetune_unavailable:
            return self._unavailable(method, path, base)
        if record.auth != "ok":
            return JSONResponse(_envelope("Invalid token (the API key is missing or wrong)", "invalid_api_key"), 401)

        data, error = _json_body(body) if method == "POST" else (None, None)
        if error is not None:
            return error
        with self._lock:
            if method == "POST" and path == "/flux/v1/finetune":
                return self._submit_finetune(data, record)
            if method == "GET" and path == "/flux/v1/finetune_details":
                return self._finetune_details(query)
            if method == "GET" and path == "/flux/v1/my_finetunes":
                return JSONResponse({"finetunes": list(self._finetunes)})
            if method == "POST" and path == "/flux/v1/delete_finetune":
                return self._delete_finetune(data)
            if method == "GET" and path == "/flux/v1/get_result":
                return self._get_result(query, base)
            if method == "POST" and path == "/v1/chat/completions":
                return self._chat(data)
            if method == "POST" and path.startswith("/flux/v1/"):
                model = path.removeprefix("/flux/v1/")
                if model in MODELS:
                    return self._generate(model, data, base)
        return JSONResponse(_envelope(f"Invalid URL ({method} {path})", type_="invalid_request_error"), 404)

    # Knobs the admin route may change (for a fake run in another process, e.g. browser tests).
    _ADMIN_KNOBS = ("pending_polls", "finetune_pending_polls", "sample_ttl", "moderation_word",
                    "content_moderation_seed", "error_word", "finetune_unavailable", "min_images", "max_images")

    def _admin(self, method: str, path: str, body: bytes) -> Response:
        """Test-only control routes (no auth; the fake listens on loopback):

        GET /_fake/requests; POST /_fake/reset; POST /_fake/settings {knob: value};
        POST /_fake/fault {"action": "fail"|"reset"|"delay", "path": ..., plus that method's kwargs}.
        """
        if method == "GET" and path == "/_fake/requests":
            return JSONResponse([r.to_dict() for r in self.requests()])
        data, error = _json_body(body or b"{}")
        if error is not None or method != "POST":
            return error or JSONResponse({"detail": "Method Not Allowed"}, 405)
        try:
            if path == "/_fake/reset":
                self.reset()
            elif path == "/_fake/settings":
                unknown = set(data) - set(self._ADMIN_KNOBS)
                if unknown or data.get("finetune_unavailable", None) not in UNAVAILABLE_MODES:
                    raise ValueError(f"unknown setting or value: {sorted(unknown) or data}")
                with self._lock:
                    for name, value in data.items():
                        setattr(self, name, value)
            elif path == "/_fake/fault":
                action = data.pop("action", "fail")
                adders = {"fail": self.fail_next, "reset": self.reset_next, "delay": self.delay_next}
                adders[action](**data)
            else:
                return JSONResponse({"detail": "Not Found"}, 404)
        except (TypeError, ValueError, KeyError) as exc:
            return JSONResponse({"detail": f"bad admin request: {exc}"}, 400)
        return JSONResponse({"ok": True})

    def _unavailable(self, method: str, path: str, base: str) -> Response:
        mode = self.finetune_unavailable
        if mode == "301":
            return Response(b"", 301, {"location": f"{base}/"})
        if mode == "html":
            return Response(LANDING_PAGE, 200, media_type="text/html")
        if mode == "no_channel":
            model = path.rsplit("/", 1)[-1]
            return JSONResponse(
                _envelope(f"No available channel for model {model} under group default", "model_not_found"), 503
            )
        return JSONResponse(_envelope(f"Invalid URL ({method} {path})", type_="invalid_request_error"), 404)

    # ----------------------------------------------------------------- fine-tuning

    def _submit_finetune(self, data: dict, record: RecordedRequest) -> Response:
        errors: list[dict] = []
        check = _Checker(data, errors)
        file_data = check.string("file_data", required=True)
        comment = check.string("finetune_comment", required=True)
        mode = check.enum("mode", FINETUNE_MODES, required=True)
        trigger = check.string("trigger_word", default="TOK")
        iterations = check.integer("iterations", 100, 1000, default=300)
        learning_rate = check.number("learning_rate", 1e-6, 5e-3, default=None)
        captioning = check.boolean("captioning", default=True)
        priority = check.enum("priority", PRIORITIES, default="quality")
        ft_type = check.enum("finetune_type", FINETUNE_TYPES, default="full")
        lora_rank = check.enum("lora_rank", {16, 32}, default=32)
        check.string("webhook_url", default=None)
        check.string("webhook_secret", default=None)
        if isinstance(file_data, str):
            summary = self._check_zip(file_data, errors)
            if summary:
                record.extra.update(summary)
        if errors:
            return _unprocessable(errors)
        finetune_id = uuid.uuid4().hex
        now = self.clock()
        self._finetunes[finetune_id] = {
            "finetune_comment": comment, "trigger_word": trigger, "mode": mode, "finetune_type": ft_type,
            "lora_rank": lora_rank, "iterations": iterations, "learning_rate": learning_rate,
            "priority": priority, "captioning": captioning, "timestamp": _now_iso(now),
            "image_count": record.extra.get("images"),
        }
        self._tasks[finetune_id] = _Task(finetune_id, "finetune", self.finetune_pending_polls, prompt=comment, created=now)
        record.extra["finetune_id"] = finetune_id
        return JSONResponse({"finetune_id": finetune_id})

    def _check_zip(self, file_data: str, errors: list[dict]) -> dict[str, Any] | None:
        loc = ["body", "file_data"]
        try:
            raw = base64.b64decode(file_data, validate=True)
        except (binascii.Error, ValueError):
            errors.append({"loc": loc, "msg": "file_data is not valid base64", "type": "value_error"})
            return None
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
        except zipfile.BadZipFile:
            errors.append({"loc": loc, "msg": "file_data is not a ZIP archive", "type": "value_error"})
            return None
        images = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        captions = [n for n in names if n.lower().endswith(".txt")]
        if not self.min_images <= len(images) <= self.max_images:
            errors.append({
                "loc": loc, "type": "value_error",
                "msg": f"the ZIP must hold {self.min_images} to {self.max_images} images (JPG, JPEG, PNG, WebP); it holds {len(images)}",
            })
        return {"file_bytes": len(raw), "file_sha256": hashlib.sha256(raw).hexdigest(), "images": len(images), "captions": len(captions)}

    def _finetune_details(self, query: dict) -> Response:
        finetune_id = query.get("finetune_id", "")
        if not finetune_id:
            return _unprocessable([{"loc": ["query", "finetune_id"], "msg": "field required", "type": "missing"}])
        info = self._finetunes.get(finetune_id)
        if info is None:
            return JSONResponse({"detail": f"Finetune {finetune_id} not found"}, 404)
        return JSONResponse({"finetune_details": {k: v for k, v in info.items() if k != "image_count"}})

    def _delete_finetune(self, data: dict) -> Response:
        errors: list[dict] = []
        finetune_id = _Checker(data, errors).string("finetune_id", required=True)
        if errors:
            return _unprocessable(errors)
        if finetune_id not in self._finetunes:
            return JSONResponse({"detail": f"Finetune {finetune_id} not found"}, 404)
        del self._finetunes[finetune_id]
        self._tasks.pop(finetune_id, None)
        return JSONResponse({
            "status": "success", "message": "Finetune deleted", "deleted_finetune_id": finetune_id,
            "timestamp": _now_iso(self.clock()),
        })

    # ----------------------------------------------------------------- generation

    def _generate(self, model: str, data: dict, base: str) -> Response:
        rules = MODELS[model]
        errors: list[dict] = []
        check = _Checker(data, errors)
        prompt = check.string("prompt", required="finetune" not in rules, default="")
        seed = check.integer("seed", 0, 2**32 - 1, default=None)
        check.integer("safety_tolerance", 0, rules["tolerance"], default=2)
        formats = {"jpeg", "png", "webp"} if rules.get("webp") else {"jpeg", "png"}
        output_format = check.enum("output_format", formats, default="jpeg")
        check.boolean("prompt_upsampling", default=False)
        check.string("image_prompt", default=None)
        check.string("webhook_url", default=None)
        check.string("webhook_secret", default=None)
        width, height = 1024, 768
        if rules.get("size"):
            width = check.integer("width", 256, 1440, default=1024, multiple=32)
            height = check.integer("height", 256, 1440, default=768, multiple=32)
        if rules.get("aspect"):
            width, height = check.aspect_ratio("aspect_ratio", default="16:9")
            check.boolean("raw", default=False)
        if "steps" in rules:
            check.integer("steps", *rules["steps"], default=28)
        if "guidance" in rules:
            check.number("guidance", *rules["guidance"], default=3.0)
        finetune_id, strength = None, 0.0
        if "finetune" in rules:
            low, high, default = rules["finetune"]
            finetune_id = check.string("finetune_id", required=True)
            strength = check.number("finetune_strength", low, high, default=default) or 0.0
            if model.endswith("ultra-finetuned"):
                check.number("image_prompt_strength", 0.0, 1.0, default=0.1)
            if isinstance(finetune_id, str):
                task = self._tasks.get(finetune_id)
                if finetune_id not in self._finetunes:
                    errors.append({"loc": ["body", "finetune_id"], "msg": f"Finetune {finetune_id} not found", "type": "value_error"})
                elif task is not None and task.status != "Ready":
                    errors.append({"loc": ["body", "finetune_id"], "msg": f"Finetune {finetune_id} is not ready", "type": "value_error"})
        if errors:
            return _unprocessable(errors)
        task_id = uuid.uuid4().hex
        if seed is None:  # deterministic stand-in for "random"
            seed = int.from_bytes(hashlib.sha256(f"{prompt}|{len(self._tasks)}".encode()).digest()[:4], "big")
        self._tasks[task_id] = _Task(
            task_id, "generate", self.pending_polls, prompt=prompt or "", seed=seed, model=model,
            width=width, height=height, finetune_id=finetune_id, strength=float(strength),
            output_format=output_format or "jpeg", created=self.clock(),
        )
        return JSONResponse({
            "id": task_id, "polling_url": f"{base}/flux/v1/get_result?id={task_id}",
            "cost": 4.0, "input_mp": 0.0, "output_mp": round(width * height / 1e6, 2),
        })

    # ----------------------------------------------------------------- polling & samples

    def _get_result(self, query: dict, base: str) -> Response:
        task_id = query.get("id", "")
        if not task_id:
            return _unprocessable([{"loc": ["query", "id"], "msg": "field required", "type": "missing"}])
        task = self._tasks.get(task_id)
        if task is None:
            return JSONResponse({"id": task_id, "status": "Task not found", "result": None, "progress": None,
                                 "details": None, "preview": None})
        if task.status == "Pending":
            self._advance(task)
        return JSONResponse(self._result_body(task, base))

    def _advance(self, task: _Task) -> None:
        task.polls += 1
        if task.kind == "generate" and self.moderation_word and self.moderation_word.lower() in task.prompt.lower():
            task.status = "Request Moderated"  # refused before it runs
            return
        if task.polls <= task.pending_polls:
            return
        if task.kind == "generate" and self.error_word and self.error_word.lower() in task.prompt.lower():
            task.status, task.message = "Error", "Generation failed: the worker crashed"
        elif task.kind == "generate" and task.seed == self.content_moderation_seed:
            task.status = "Content Moderated"
        else:
            task.status, task.ready_at = "Ready", self.clock()
            if task.kind == "generate":
                task.sample_token = uuid.uuid4().hex
                self._samples[task.sample_token] = _Sample(task.id, task.ready_at)

    def _result_body(self, task: _Task, base: str) -> dict[str, Any]:
        body: dict[str, Any] = {"id": task.id, "status": task.status, "result": None, "progress": None,
                                "details": None, "preview": None}
        if task.status == "Pending":
            if not (task.kind == "finetune" and task.polls <= 1):  # fine-tunes start with progress null
                body["progress"] = round(min(task.polls / (task.pending_polls + 1), 0.99), 3)
        elif task.status == "Ready" and task.kind == "generate":
            expiry = int(task.ready_at + self.sample_ttl)
            body["progress"] = 1.0
            body["result"] = {
                "sample": f"{base}/samples/{task.sample_token}.{_ext(task.output_format)}?se={expiry}&sig=fake",
                "prompt": task.prompt, "seed": task.seed,
                "start_time": task.created, "end_time": task.ready_at,
                "duration": round(task.ready_at - task.created, 3),
            }
        elif task.status == "Ready":
            body["progress"] = 1.0
            body["result"] = {"finetune_id": task.id}
        elif task.status == "Error":
            body["result"] = {"message": task.message or "Task failed"}
        return body

    def _sample(self, path: str) -> Response:
        token = path.removeprefix("/samples/").rsplit(".", 1)[0]
        with self._lock:
            sample = self._samples.get(token)
            if sample is None:
                return _storage_error(404, "BlobNotFound", "The specified blob does not exist.")
            if self.clock() > sample.issued + self.sample_ttl:
                return _storage_error(403, "AuthenticationFailed", "Signed expiry time has passed.")
            task = self._tasks.get(sample.task_id)
            if sample.content is None and task is not None:
                sample.content = render_sample(task.prompt, task.seed, task.width, task.height, task.finetune_id,
                                               task.strength, task.output_format)
            content, fmt = sample.content or b"", task.output_format if task else "jpeg"
        return Response(content, 200, media_type=f"image/{fmt}")

    # ----------------------------------------------------------------- chat (captioning)

    def _chat(self, data: dict) -> Response:
        model, messages = data.get("model"), data.get("messages")
        if not isinstance(model, str) or not model:
            return JSONResponse(_envelope("model is required", "invalid_request", "model"), 400)
        if not isinstance(messages, list) or not messages:
            return JSONResponse(_envelope("messages must be a non-empty list", "invalid_request", "messages"), 400)
        images = [part for message in messages if isinstance(message, dict)
                  for part in (message.get("content") if isinstance(message.get("content"), list) else [])
                  if isinstance(part, dict) and part.get("type") == "image_url"]
        if images:
            content = " ".join(f"Image {i}: {_describe_image(part)}." for i, part in enumerate(images, 1))
        else:
            content = "There is no image to describe."
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(self.clock()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 85 * max(1, len(images)), "completion_tokens": len(content.split()),
                      "total_tokens": 85 * max(1, len(images)) + len(content.split())},
        })


# --------------------------------------------------------------------------- validation helper


class _Checker:
    """Checks JSON fields and appends BFL/FastAPI-style ``detail`` entries on violations."""

    _MISSING = object()

    def __init__(self, data: dict, errors: list[dict]) -> None:
        self.data, self.errors = data, errors

    def _get(self, name: str, required: bool, default: Any) -> Any:
        value = self.data.get(name, self._MISSING)
        if value is self._MISSING or value is None:
            if required:
                self._fail(name, "field required", "missing")
                return self._MISSING
            return default
        return value

    def _fail(self, name: str, msg: str, type_: str = "value_error") -> None:
        self.errors.append({"loc": ["body", name], "msg": msg, "type": type_})

    def string(self, name: str, *, required: bool = False, default: Any = None) -> Any:
        value = self._get(name, required, default)
        if value is self._MISSING or value is default:
            return None if value is self._MISSING else value
        if not isinstance(value, str) or (required and not value.strip()):
            self._fail(name, "must be a non-empty string" if required else "must be a string")
            return None
        return value

    def enum(self, name: str, allowed: set, *, required: bool = False, default: Any = None) -> Any:
        value = self._get(name, required, default)
        if value is self._MISSING:
            return None
        if value not in allowed or isinstance(value, bool):
            self._fail(name, f"must be one of {', '.join(map(str, sorted(allowed, key=str)))}")
            return None
        return value

    def integer(self, name: str, low: int, high: int, *, default: Any = None, multiple: int = 1) -> Any:
        value = self._get(name, False, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(name, "must be a whole number", "int_type")
            return default
        if not low <= value <= high:
            self._fail(name, f"must be between {low} and {high}")
        elif value % multiple:
            self._fail(name, f"must be a multiple of {multiple}")
        return value

    def number(self, name: str, low: float, high: float, *, default: Any = None) -> Any:
        value = self._get(name, False, default)
        if value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self._fail(name, "must be a number", "float_type")
            return default
        if not low <= value <= high:
            self._fail(name, f"must be between {low:g} and {high:g}")
        return value

    def boolean(self, name: str, *, default: bool) -> Any:
        value = self._get(name, False, default)
        if not isinstance(value, bool):
            self._fail(name, "must be true or false", "bool_type")
            return default
        return value

    def aspect_ratio(self, name: str, *, default: str) -> tuple[int, int]:
        value = self._get(name, False, default)
        try:
            w, h = (int(p) for p in str(value).split(":"))
            ratio = w / h
        except (ValueError, ZeroDivisionError):
            self._fail(name, "must look like 16:9")
            return 1024, 768
        if not 9 / 21 - 1e-9 <= ratio <= 21 / 9 + 1e-9:
            self._fail(name, "must be between 21:9 and 9:21")
        # About one megapixel with the requested shape, on the /32 grid (kept small on purpose).
        width = max(256, round(math.sqrt(1_000_000 * ratio) / 32) * 32)
        height = max(256, round(math.sqrt(1_000_000 / ratio) / 32) * 32)
        return width, height


# --------------------------------------------------------------------------- pure helpers


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def _json_body(body: bytes) -> tuple[dict, Response | None]:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        return {}, _unprocessable([{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}])
    if not isinstance(data, dict):
        return {}, _unprocessable([{"loc": ["body"], "msg": "body must be a JSON object", "type": "dict_type"}])
    return data, None


def _unprocessable(errors: list[dict]) -> Response:
    return JSONResponse({"detail": errors}, 422)


def _storage_error(status: int, code: str, message: str) -> Response:
    xml = f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return Response(xml, status, media_type="application/xml")


def _elide(value: Any, limit: int = 256) -> Any:
    """The JSON body as recorded: long strings (base64 files, data URLs) shortened."""
    if isinstance(value, str) and len(value) > limit:
        return f"<{len(value)} chars>"
    if isinstance(value, dict):
        return {k: _elide(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_elide(v, limit) for v in value]
    return value


def _is_finetune_route(path: str) -> bool:
    return path.startswith("/flux/v1/") and "finetune" in path.rsplit("/", 1)[-1]


def _ext(output_format: str) -> str:
    return {"jpeg": "jpeg", "png": "png", "webp": "webp"}.get(output_format, "jpeg")


async def _read_body(receive: Callable) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def sample_colour(prompt: str, seed: int, finetune_id: str | None = None, strength: float = 0.0) -> tuple[int, int, int]:
    """The main colour of a sample: from prompt + seed, pulled towards the fine-tune's colour."""
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
    base = colorsys.hsv_to_rgb(digest[0] / 255, 0.35 + digest[1] / 1020, 0.55 + digest[2] / 1020)
    if finetune_id and strength:
        tune = hashlib.sha256(finetune_id.encode()).digest()
        target = colorsys.hsv_to_rgb(tune[0] / 255, 0.9, 0.9)
        mix = min(1.0, strength / 2.0)
        base = tuple(b * (1 - mix) + t * mix for b, t in zip(base, target))
    return tuple(int(round(c * 255)) for c in base)  # type: ignore[return-value]


def render_sample(prompt: str, seed: int, width: int, height: int, finetune_id: str | None = None,
                  strength: float = 0.0, output_format: str = "jpeg") -> bytes:
    """A small real image: a flat colour with a darker band whose width encodes the strength."""
    colour = sample_colour(prompt, seed, finetune_id, strength)
    img = Image.new("RGB", (width, height), colour)
    band = int(width * min(1.0, strength / 2.0))
    if band:
        ImageDraw.Draw(img).rectangle((0, height - height // 8, band, height), fill=tuple(c // 2 for c in colour))
    buf = io.BytesIO()
    img.save(buf, {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(output_format, "JPEG"), quality=85)
    return buf.getvalue()


def _describe_image(part: dict) -> str:
    url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) else ""
    if not url.startswith("data:") or ";base64," not in url:
        return "a remote image"
    try:
        with Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1]))) as img:
            rgb = img.convert("RGB")
            r, g, b = (int(c) for c in rgb.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)))
            return f"a {img.width}x{img.height} photo, mostly rgb({r},{g},{b})"
    except Exception:
        return "an image that could not be read"


# --------------------------------------------------------------------------- standalone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake CometAPI server (for trying the app by hand).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--key", default="test-key", help="the API key the fake accepts")
    parser.add_argument("--pending-polls", type=int, default=2)
    parser.add_argument("--finetune-pending-polls", type=int, default=3)
    parser.add_argument("--sample-ttl", type=float, default=600.0)
    parser.add_argument("--finetune-unavailable", choices=[m for m in UNAVAILABLE_MODES if m], default=None)
    parser.add_argument("--moderation-word", default="forbidden")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fake = FakeCometAPI(
        api_key=args.key, pending_polls=args.pending_polls, finetune_pending_polls=args.finetune_pending_polls,
        sample_ttl=args.sample_ttl, finetune_unavailable=args.finetune_unavailable,
        moderation_word=args.moderation_word, host=args.host, port=args.port, log_level=args.log_level,
    ).start()
    print(f"Fake CometAPI listening on {fake.url} (accepts key {args.key!r}); Ctrl+C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
