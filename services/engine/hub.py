"""Publishing a trained LoRA folder (weights, model card, samples) to the Hugging Face Hub.

The token is a ``Secret``: it is revealed only to build the ``HfApi`` client, never written to
disk, logged or put in an error message.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from services.config import Secret
from services.errors import (
    AuthError,
    InputError,
    NetworkError,
    ProviderError,
    RateLimitedError,
    ServerError,
    ValidationError,
)

HUB_URL = "https://huggingface.co"


def validate_repo_id(repo_id: str) -> str:
    """``owner/name`` by the Hub's own rule (huggingface_hub's validator), or InputError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hub_rule

    repo_id = (repo_id or "").strip()
    try:
        hub_rule(repo_id)
    except HFValidationError:
        repo_id = ""
    if repo_id.count("/") != 1:  # the Hub's rule also takes a bare name; a repo to write to needs its owner
        raise InputError("That is not a Hub repository name.",
                         hint="Use your-username/model-name (letters, digits, '-', '_' or '.').")
    return repo_id


def publish_lora(folder: Path, repo_id: str, token: Secret, private: bool = True, *, api=None) -> str:
    """Create (or reuse) the model repo and upload ``folder``; returns the repo's URL.

    ``api`` is an ``HfApi`` for tests; by default one is built from ``token``.
    """
    folder = Path(folder)
    repo_id = validate_repo_id(repo_id)
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise InputError("There is no trained LoRA to publish yet.", hint="Wait until the fine-tune is ready.")
    if not isinstance(token, Secret) or not token:
        raise AuthError("A Hugging Face token is needed to publish.",
                        hint="Create a token with write access at huggingface.co/settings/tokens.")
    secret = token.reveal()
    try:
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=secret)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload FLUX LoRA from FLUX Finetune Studio")
    except ProviderError:
        raise
    except Exception as exc:  # map, and never let the token travel in a message
        raise upload_error(exc, repo_id, secret) from None
    return str(getattr(url, "url", "") or f"{HUB_URL}/{repo_id}")


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 later).

    Its HfHubHTTPError derives from that client's HTTPError; TransportError (connect, timeouts,
    protocol, proxy) sits beside it in the same module.
    """
    from huggingface_hub.errors import HfHubHTTPError

    for base in HfHubHTTPError.__mro__[1:]:
        transport = getattr(importlib.import_module(base.__module__), "TransportError", None)
        if isinstance(transport, type) and issubclass(transport, BaseException):
            return (transport,)
    return ()


def status_of(exc: BaseException) -> int | None:
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


def redact(text: str, secret: str) -> str:
    """``text`` with the token replaced wherever it stands."""
    return text.replace(secret, "********") if secret else text


def scrub(text: str, secret: str) -> str:
    """The first line of an error's text, with the token replaced, for a message."""
    text = redact(text, secret)
    return text.splitlines()[0][:300] if text else ""


def upload_error(exc: Exception, repo_id: str, secret: str) -> ProviderError:
    from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError, RepositoryNotFoundError

    detail = scrub(str(exc), secret)
    code = status_of(exc)
    if code in (401, 403) or isinstance(exc, LocalTokenNotFoundError):
        return AuthError(f"The Hugging Face Hub refused the token for {repo_id} ({code or 'no token'}).",
                         hint="Use a token with write access to that namespace (huggingface.co/settings/tokens).")
    if code == 429:
        return RateLimitedError("The Hugging Face Hub is rate limiting uploads.", hint="Try again in a few minutes.")
    if code is not None and code >= 500:
        return ServerError(f"The Hugging Face Hub failed ({code}).", hint="Try again in a few minutes.")
    if code in (400, 404, 409, 422) or isinstance(exc, (HFValidationError, RepositoryNotFoundError)):
        return ValidationError(f"The Hugging Face Hub rejected the upload to {repo_id}: {detail or code}.",
                               hint="Check the repository name and that you may write to it.")
    if isinstance(exc, (ConnectionError, TimeoutError, *transport_errors())):
        return NetworkError("Could not reach the Hugging Face Hub.", hint="Check the connection and try again.")
    return ProviderError(f"Publishing to the Hugging Face Hub failed: {detail or type(exc).__name__}.",
                         hint="Try again.")
