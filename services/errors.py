"""The error hierarchy. Services raise these; the UI turns them into gr.Warning / gr.Error.

Every message is written for the person using the app: what was wrong and what to do.
Messages never contain secrets (API keys); see ``services.config.Secret``.
"""
from __future__ import annotations


class StudioError(Exception):
    """Base for every error a user can see."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def user_message(self) -> str:
        return f"{self.message} {self.hint}".strip()

    def __str__(self) -> str:
        return self.user_message()


class InputError(StudioError):
    """Something the user entered or uploaded is not usable."""


class DatasetError(StudioError):
    """A dataset cannot be opened, changed or exported."""


class ConfigError(StudioError):
    """A setting (environment variable) is missing or malformed."""


class ProviderError(StudioError):
    """A training / generation provider failed. Subclasses say how."""

    retryable: bool = False


class AuthError(ProviderError):
    """The API key is missing, wrong or not allowed to do this (401/403)."""


class InsufficientCreditsError(ProviderError):
    """The account has no credits left (402)."""


class RateLimitedError(ProviderError):
    """Too many requests (429). ``retry_after`` is in seconds when the server said."""

    retryable = True

    def __init__(self, message: str, *, hint: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class ValidationError(ProviderError):
    """The provider rejected a field (400/422). ``fields`` maps field name to message."""

    def __init__(self, message: str, *, hint: str = "", fields: dict[str, str] | None = None) -> None:
        super().__init__(message, hint=hint)
        self.fields = dict(fields or {})


class ModeratedError(ProviderError):
    """The prompt or the output was blocked by the provider's safety filter.

    ``kind`` is ``"request"`` (the prompt / input was refused) or ``"content"`` (the output
    image was), or ``""`` when the provider did not say.
    """

    def __init__(self, message: str, *, hint: str = "", kind: str = "") -> None:
        super().__init__(message, hint=hint)
        self.kind = kind


class TaskNotFoundError(ProviderError):
    """The provider does not know this task / fine-tune id (expired or never existed)."""


class EndpointUnavailableError(ProviderError):
    """The endpoint does not exist or is switched off (404, 301, HTML instead of JSON)."""


class ServerError(ProviderError):
    """The provider failed on its side (5xx)."""

    retryable = True


class NetworkError(ProviderError):
    """The provider could not be reached (DNS, refused, reset, timeout)."""

    retryable = True


class JobError(StudioError):
    """A job cannot be found, started or changed."""


class EngineUnavailableError(ProviderError):
    """An optional engine (torch/diffusers) is not installed."""


class WaitTimeoutError(ProviderError):
    """A task was still not finished when the caller stopped waiting. It may still finish."""

    retryable = True


class ResultExpiredError(ProviderError):
    """A result image link no longer works (signed URLs expire after about 10 minutes)."""


class NotServedError(ProviderError):
    """No inference provider serves this model or adapter (a private LoRA, or one no provider maps)."""
