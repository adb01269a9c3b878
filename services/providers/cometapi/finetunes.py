"""Fine-tunes on the account: upload a dataset to start one, read one's details, list, delete.

The dataset zip is sent as base64 *inside* a JSON body. A 500 MB zip would be a 670 MB string,
so the body is streamed: JSON prefix, base64 of file blocks (block size a multiple of 3, so the
pieces concatenate into one valid base64 string), JSON suffix, with the Content-Length computed
up front (no chunked encoding, which some gateways refuse).
"""
from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.errors import InputError, ProviderError, ValidationError
from services.providers.base import TrainRequest
from services.providers.cometapi.connection import Connection
from services.providers.cometapi.error_mapping import MAYBE_RECEIVED_HINT
from services.providers.cometapi.fields import as_float, as_int, as_str, require_id

# Uploading a few hundred MB of base64 takes minutes on a home line, and the server may take
# a while to decode it before answering.
UPLOAD_TIMEOUT = httpx.Timeout(connect=10.0, read=180.0, write=900.0, pool=10.0)
# Raw bytes per block of the streamed upload. Must be a multiple of 3: base64 of each block then
# has no padding, so the encoded blocks join into one valid base64 string.
UPLOAD_BLOCK = 3 * 64 * 1024

ProgressCallback = Callable[[int, int], None]


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


class Finetunes:
    """The fine-tune endpoints: ``finetune``, ``finetune_details``, ``my_finetunes``, ``delete_finetune``.
    A fine-tune's training is followed like any task, with ``Tasks``."""

    def __init__(self, connection: Connection, *, upload_timeout: httpx.Timeout = UPLOAD_TIMEOUT) -> None:
        self._connection = connection
        self._upload_timeout = upload_timeout

    def submit(
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
        # The app's rule for training settings, checked before uploading hundreds of MB only to get a 422.
        settings = TrainRequest(name=comment, mode=mode, trigger_word=trigger_word, iterations=iterations,
                                learning_rate=learning_rate, lora_rank=lora_rank, finetune_type=finetune_type,
                                priority=priority, captioning=captioning)
        _raise_for_problems(str(comment or ""), settings.settings_problems())
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
        try:
            size = zip_path.stat().st_size
        except OSError:
            raise InputError(
                f"The dataset zip '{zip_path.name}' could not be read.", hint="Export the dataset again, then retry."
            ) from None
        if size == 0:
            raise InputError(f"The dataset zip '{zip_path.name}' is empty.", hint="Export the dataset again, then retry.")
        body = _StreamedFinetuneBody(zip_path, size, {k: v for k, v in fields.items() if v is not None})
        data = self._connection.request(
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
                hint=MAYBE_RECEIVED_HINT,
            )
        return str(finetune_id)

    def details(self, finetune_id: str) -> FinetuneDetails:
        require_id(finetune_id, "finetune_id")
        data = self._connection.request(
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
            comment=as_str(info.get("finetune_comment")),
            trigger_word=as_str(info.get("trigger_word")),
            mode=as_str(info.get("mode")),
            finetune_type=as_str(info.get("finetune_type")),
            lora_rank=as_int(info.get("lora_rank")),
            iterations=as_int(info.get("iterations")),
            learning_rate=as_float(info.get("learning_rate")),
            priority=as_str(info.get("priority")),
            timestamp=as_str(info.get("timestamp")),
            raw=info,
        )

    def list_ids(self) -> list[str]:
        """The ids of the account's fine-tunes (newest last, in practice)."""
        data = self._connection.request("GET", "/flux/v1/my_finetunes", idempotent=True)
        items = data.get("finetunes", []) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ProviderError("CometAPI sent a fine-tune list this app cannot read.", hint="Try again later.")
        # Tolerate a list of objects as well as the documented list of ids.
        ids = [str(i.get("finetune_id") or i.get("id")) if isinstance(i, dict) else str(i) for i in items]
        return [i for i in ids if i and i != "None"]

    def delete(self, finetune_id: str) -> dict[str, Any]:
        require_id(finetune_id, "finetune_id")
        data = self._connection.request(
            "POST",
            "/flux/v1/delete_finetune",
            json_body={"finetune_id": finetune_id},
            idempotent=False,
            not_found=f"CometAPI does not know fine-tune '{finetune_id}' (already deleted?).",
        )
        return data if isinstance(data, dict) else {"result": data}


def _raise_for_problems(comment: str, problems: dict[str, str]) -> None:
    if not comment.strip():
        problems = {"finetune_comment": "give the fine-tune a name", **problems}
    if problems:
        summary = "; ".join(f"{k}: {v.rstrip('.')}" for k, v in problems.items())
        raise ValidationError(f"The fine-tune settings are not valid: {summary}.", hint="Fix them and submit again.",
                              fields=problems)


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
