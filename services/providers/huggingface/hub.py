"""Whose Hugging Face account a provider acts for, its ``HfApi``, and what a Hub error means to a person.

The token is a ``Secret``: revealed only to build the ``HfApi`` / ``InferenceClient`` and as a job's
``secrets=`` entry, never logged, written, put in a label, an environment variable or a message.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from services.config import Secret, Settings
from services.errors import (
    AuthError,
    InsufficientCreditsError,
    NetworkError,
    ProviderError,
    RateLimitedError,
    ServerError,
    TaskNotFoundError,
    ValidationError,
)
from services.engine.hub import HUB_URL, scrub, status_of, transport_errors

BILLING_URL = f"{HUB_URL}/settings/billing"
TOKENS_URL = f"{HUB_URL}/settings/tokens"
# What each kind of call needs a fine-grained token to be allowed (the names on the token page).
RIGHTS = {
    "jobs": "start and manage Jobs ('Jobs' permission)",
    "repos": "write to your repositories ('Write access to contents/settings of all repos')",
    "inference": "call Inference Providers ('Make calls to Inference Providers')",
    "read": "read your repositories",
}
# Words in a refusal that say the account can't pay, whatever its status code (402, or 403 on some routes).
BILLING_WORDS = ("payment", "billing", "credit")
HOSTED_SIGN_IN = ("Sign in with Hugging Face (button at the top) to train and generate on your own account; "
                  "this Space never spends its owner's credits.")
LOCAL_NO_TOKEN = ("No Hugging Face token: set HF_TOKEN or run `hf auth login` with a token that may start Jobs, "
                  "write to your repositories and call Inference Providers.")

T = TypeVar("T")


def resolve_token(settings: Settings, token: Secret | None) -> Secret:
    """The token a provider acts with: a visitor's own (``token``); hosted, nothing else ever (the Space's
    HF_TOKEN is its owner's); locally HF_TOKEN, else the saved ``hf auth login``."""
    if token is not None:
        return token
    if settings.hosted:
        return Secret("")
    if settings.hf_token:
        return settings.hf_token
    try:
        from huggingface_hub import get_token

        return Secret(get_token())
    except ImportError:
        return Secret("")


def make_api(token: Secret):
    """An ``HfApi`` that acts with ``token`` only (never a token found elsewhere on the machine)."""
    from huggingface_hub import HfApi

    return HfApi(token=token.reveal())


def call(action: str, secret: Secret, fn: Callable[[], T], what: str = "") -> T:
    """``fn()``, with any Hub failure turned into the project's errors (``map_error``)."""
    try:
        return fn()
    except ProviderError:
        raise
    except Exception as exc:  # map, and never let the token travel in a message
        raise map_error(exc, action, secret, what) from None


def map_error(exc: BaseException, action: str, secret: Secret, what: str = "") -> ProviderError:
    """A Hub or router failure as a ``ProviderError`` that says what to do. ``action`` is a ``RIGHTS`` key:
    the right a refused token lacks; ``what`` names the thing acted on, for a 404."""
    from huggingface_hub.errors import GatedRepoError, LocalTokenNotFoundError

    raw = getattr(exc, "server_message", None) or str(exc)
    detail = scrub(str(raw), secret.reveal())
    code = status_of(exc)
    lowered = detail.lower()
    if code == 402 or (code in (400, 403) and any(w in lowered for w in BILLING_WORDS)):
        return InsufficientCreditsError(
            "Hugging Face refused: the account has no payment method or credits for this.",
            hint=f"Add a payment method or credits at {BILLING_URL}, then try again.")
    if isinstance(exc, GatedRepoError):
        repo = getattr(exc, "repo_id", None) or what or "the base model"
        return AuthError(f"Your Hugging Face account has not been granted access to {repo} (a gated model).",
                         hint=f"Accept its licence at {HUB_URL}/{repo}, then try again.")
    if code == 401 or isinstance(exc, LocalTokenNotFoundError):
        return AuthError("Hugging Face refused the token (401): it is wrong, expired or missing.",
                         hint=f"Sign in again, or create a new token at {TOKENS_URL}.")
    if code == 403:
        right = RIGHTS.get(action, action)
        return AuthError(f"The Hugging Face token may not {right} (403).",
                         hint=f"Give the token that right at {TOKENS_URL} (or use a write token), then try again.")
    if code == 404:
        return TaskNotFoundError(f"Hugging Face has no {what or 'such job or repository'} (404).",
                                 hint="It may have been deleted.")
    if code == 429:
        return RateLimitedError("Hugging Face is rate limiting this account.", hint="Try again in a few minutes.")
    if code is not None and code >= 500:
        return ServerError(f"Hugging Face failed on its side ({code}).", hint="Try again in a few minutes.")
    if code in (400, 409, 422):
        return ValidationError(f"Hugging Face rejected the request: {detail or code}.",
                               hint="Check the settings and try again.")
    if isinstance(exc, (ConnectionError, TimeoutError, *transport_errors())):
        return NetworkError("Could not reach Hugging Face.", hint="Check the connection and try again.")
    return ProviderError(f"Hugging Face failed: {detail or type(exc).__name__}.", hint="Try again.")
