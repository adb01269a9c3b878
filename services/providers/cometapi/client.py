"""The CometAPI client: one object per account (base URL + key) for everything the app asks of CometAPI.

It talks to CometAPI over HTTP and nothing else (no gradio, no job store). Every failure is
raised as a ``services.errors`` class with a message that says what went wrong and what to do.
The contract it follows is ``/work/shared/cometapi-contract.md``. Its parts, each in its module:

* ``client.finetunes`` (finetunes.py): upload a dataset to start a fine-tune, details, list, delete;
* ``client.images`` (images.py): start an image with a base model or a fine-tune, save a result;
* ``client.tasks`` (tasks.py): poll a task (an image or a fine-tune) once or until it is done;
* ``client.chat`` (chat.py): the OpenAI-compatible chat that captions images;
* all of them send through one ``Connection`` (connection.py: the key, retries, typed errors,
  which error_mapping.py picks from each answer).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from services.config import Secret
from services.providers.cometapi.chat import Chat
from services.providers.cometapi.connection import DEFAULT_TIMEOUT, Connection
from services.providers.cometapi.finetunes import UPLOAD_TIMEOUT, Finetunes
from services.providers.cometapi.images import Images
from services.providers.cometapi.tasks import Tasks

if TYPE_CHECKING:  # only for the type hint
    from services.config import Settings


class CometAPIClient:
    """Client for CometAPI's FLUX (BFL-format) and OpenAI-compatible chat endpoints.

    Thread-safe: one client can serve every Gradio worker thread. Use as a context manager or
    call ``close()``. ``sleep``, ``clock`` and ``rand`` are injectable so tests run fast and
    deterministically.
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
        self._connection = Connection(
            base_url, api_key, http_transport=transport, sleep=sleep, rand=rand, timeout=timeout,
            max_attempts=max_attempts, backoff_base=backoff_base, backoff_cap=backoff_cap,
            max_retry_after=max_retry_after,
        )
        self.finetunes = Finetunes(self._connection, upload_timeout=upload_timeout)
        self.images = Images(self._connection)
        self.tasks = Tasks(self._connection, sleep=sleep, clock=clock, rand=rand, poll_initial=poll_initial,
                           poll_factor=poll_factor, poll_max=poll_max)
        self.chat = Chat(self._connection)

    @classmethod
    def from_settings(cls, settings: Settings, transport: httpx.BaseTransport | None = None, **kw: Any) -> CometAPIClient:
        return cls(settings.cometapi_base_url, settings.cometapi_key, transport=transport, **kw)

    @property
    def base_url(self) -> str:
        return self._connection.base_url

    @property
    def has_key(self) -> bool:
        return self._connection.has_key

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> CometAPIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CometAPIClient(base_url={self.base_url!r}, api_key={'set' if self.has_key else 'missing'})"

    __str__ = __repr__

    def __reduce__(self):  # pickling would copy the key
        raise TypeError("CometAPIClient cannot be pickled")
