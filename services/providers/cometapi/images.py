"""Starting images (base models and fine-tunes) and saving a finished image from its result link."""
from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from services.errors import (
    InputError,
    ProviderError,
    ResultExpiredError,
    ValidationError,
)
from services.providers.base import STRENGTH_RANGE
from services.providers.cometapi.connection import Connection
from services.providers.cometapi.error_mapping import MAYBE_RECEIVED_HINT
from services.providers.cometapi.fields import as_float, require_id
from services.storage import atomic

# Each model that takes a fine-tune, and the base model it is compared against
# (contract: "Inference with a fine-tune").
BASE_FOR: Mapping[str, str] = {
    "flux-pro-1.1-ultra-finetuned": "flux-pro-1.1-ultra",
    "flux-pro-finetuned": "flux-pro-1.1",
}
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
_MODEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,79}$")


class Images:
    """Starts generations (``POST /flux/v1/{model}``) and downloads their results."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def generate(self, model: str, **params: Any) -> str:
        """Start an image with a base model. Returns the task id (see ``Tasks.wait``)."""
        if not isinstance(model, str) or not _MODEL_RE.match(model):
            raise ValidationError(
                f"'{model}' is not a FLUX model name.", hint="Pick a model such as flux-pro-1.1.", fields={"model": "unknown model"}
            )
        body = {k: v for k, v in params.items() if v is not None}
        data = self._connection.request("POST", f"/flux/v1/{model}", json_body=body, idempotent=False)
        task_id = data.get("id") if isinstance(data, dict) else None
        if not task_id:
            raise ProviderError("CometAPI accepted the request but sent no task id.", hint=MAYBE_RECEIVED_HINT)
        return str(task_id)

    def generate_finetuned(self, model: str, finetune_id: str, finetune_strength: float, **params: Any) -> str:
        """Start an image with a fine-tune (``model`` is one of ``BASE_FOR``). Returns the task id."""
        if model not in BASE_FOR:
            raise ValidationError(
                f"'{model}' cannot use a fine-tune.",
                hint=f"Use one of: {', '.join(sorted(BASE_FOR))}.",
                fields={"model": "not a fine-tuned model"},
            )
        require_id(finetune_id, "finetune_id")
        strength = as_float(finetune_strength)
        low, high = STRENGTH_RANGE
        if strength is None or not low <= strength <= high:
            raise ValidationError(
                f"Fine-tune strength must be between {low:g} and {high:g}, got {finetune_strength!r}.",
                hint="Start around 1.1-1.2; go up to ~1.4 if the concept is missing, lower it on artifacts.",
                fields={"finetune_strength": f"must be between {low:g} and {high:g}"},
            )
        return self.generate(model, finetune_id=finetune_id, finetune_strength=strength, **params)

    def download_to(self, url: str, path: Path | str, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> Path:
        """Stream a result image to ``path`` atomically: never a half-written file, never more than
        ``max_bytes`` read, whatever the server says its size is. Result links expire after about
        10 minutes: download at once."""
        path = Path(path)
        with atomic.replacing(path) as tmp, open(tmp, "wb") as out:
            for chunk in self._chunks(url, max_bytes):
                out.write(chunk)
        return path

    def _chunks(self, url: str, max_bytes: int) -> Iterator[bytes]:
        """A result link's body, chunk by chunk, stopped past ``max_bytes``."""
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError("The result link is not a web address.", hint="Generate the image again.")
        response = self._connection.open_link(url)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_big(max_bytes)
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
                    raise _too_big(max_bytes)
                yield chunk
        finally:
            response.close()


def _too_big(max_bytes: int) -> ProviderError:
    return ProviderError(f"The result file is larger than {max_bytes // 2**20} MB; refusing to load it.",
                         hint="This is not a normal image result; generate again.")
