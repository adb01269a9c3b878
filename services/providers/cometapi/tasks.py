"""Polling a task (an image being generated, or a fine-tune training) until it is done.

Every task, whatever started it, is read with ``GET /flux/v1/get_result``.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.errors import (
    ModeratedError,
    ProviderError,
    TaskNotFoundError,
    WaitTimeoutError,
)
from services.providers.cometapi.connection import Connection
from services.providers.cometapi.fields import as_float, as_int, as_str, require_id

log = logging.getLogger(__name__)


class TaskStatus:
    """The ``status`` strings ``get_result`` answers with (exactly as the service spells them)."""

    PENDING = "Pending"
    READY = "Ready"
    ERROR = "Error"
    NOT_FOUND = "Task not found"
    REQUEST_MODERATED = "Request Moderated"
    CONTENT_MODERATED = "Content Moderated"


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
    def progress_fraction(self) -> float | None:
        """Progress in 0..1 whichever scale the service used (values above 1 are percent)."""
        if self.progress is None:
            return None
        value = self.progress / 100.0 if self.progress > 1.0 else self.progress
        return min(1.0, max(0.0, value))


class Tasks:
    """Reads a task's state once (``get``) or until it is Ready (``wait``).

    ``clock``, ``sleep`` and ``rand`` are injectable so tests run fast and deterministically.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        poll_initial: float = 1.0,
        poll_factor: float = 1.5,
        poll_max: float = 10.0,
    ) -> None:
        self._connection = connection
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._poll_initial = poll_initial
        self._poll_factor = poll_factor
        self._poll_max = poll_max

    def get(self, task_id: str) -> TaskResult:
        """One poll. Returns whatever status the task has; see ``wait`` for raising on failures."""
        require_id(task_id, "id")
        try:
            data = self._connection.request(
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
                result = self.get(task_id)
            except ProviderError as exc:
                # get already retried a few times. A long wait (fine-tunes take a while)
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
        progress=as_float(data.get("progress")),
        sample_url=as_str(res.get("sample")),
        seed=as_int(res.get("seed")),
        prompt=as_str(res.get("prompt")),
        duration=as_float(res.get("duration")),
        message=as_str(message),
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
