"""The OpenAI-compatible chat endpoint, used with a vision model to caption training images."""
from __future__ import annotations

from typing import Any

from services.errors import ProviderError
from services.providers.cometapi.connection import Connection


class Chat:
    """``POST /v1/chat/completions``: one answer from a chat model."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def complete(self, model: str, messages: list[dict[str, Any]], **kw: Any) -> str:
        """The assistant's text for ``messages`` (``kw``: more body fields, e.g. max_tokens).

        Retried like a read: it starts no job and changes nothing on the account.
        """
        body = {"model": model, "messages": messages, **{k: v for k, v in kw.items() if v is not None}}
        data = self._connection.request("POST", "/v1/chat/completions", json_body=body, idempotent=True)
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
