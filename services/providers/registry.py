"""Every provider the app offers, one line each, and what the workflows ask of them by key.

Each provider describes itself in its own folder (a ``ProviderInfo``: its credentials, its fine-tune
ids, its own request fields and Train tab choices); adding one is a new folder plus one line here.
The workflows (access, targets, training, studio) ask these functions, never a provider's name.
"""
from __future__ import annotations

from services.config import Settings
from services.providers.base import NO_CREDENTIALS, Credentials, Provider, ProviderInfo, TrainOptions
from services.providers.cometapi import provider as cometapi
from services.providers.huggingface import provider as huggingface
from services.providers.local import provider as local

# In this order where none is preferred; see ``build``.
REGISTERED: tuple[ProviderInfo, ...] = (
    cometapi.INFO,
    local.INFO,
    huggingface.INFO,
)
BY_KEY: dict[str, ProviderInfo] = {info.key: info for info in REGISTERED}


def info(key: str) -> ProviderInfo | None:
    """What provider ``key`` says of itself; None for one not registered (a test's stand-in)."""
    return BY_KEY.get(key)


def build(settings: Settings) -> dict[str, Provider]:
    """Every registered provider, app-wide; the first is the default: those that may be picked for you
    (``may_be_default``) first, each group in registry order."""
    ordered = sorted(REGISTERED, key=lambda i: not i.may_be_default(settings))
    return {i.key: i.make(settings) for i in ordered}


def credentials(key: str) -> Credentials:
    found = info(key)
    return found.credentials if found else NO_CREDENTIALS


def options_type(key: str) -> type[TrainOptions]:
    found = info(key)
    return found.options if found else TrainOptions


def train_options(key: str, **values) -> TrainOptions:
    """Provider ``key``'s own request fields from ``values`` (the others' are left out, empty ones defaulted)."""
    return options_type(key).from_values(values)


def choices(key: str) -> frozenset[str]:
    """The Train tab's fields for provider ``key`` beyond the common settings."""
    found = info(key)
    return found.choices if found else frozenset()


def hosted_job_caps(settings: Settings, keys) -> dict[str, int]:
    """Provider key -> how many jobs one hosted visitor may have queued or running there."""
    return {k: i.hosted_job_cap(settings) for k in keys if (i := info(k)) and i.hosted_job_cap}


def own_makers(settings: Settings, keys) -> dict[str, object]:
    """Provider key -> a function making it on a visitor's own credentials, for those that take them."""
    return {k: (lambda secret, i=i: i.with_credentials(settings, secret))
            for k in keys if (i := info(k)) and i.with_credentials is not None}


def guess_provider(finetune_id: str, provider_keys: list[str]) -> str:
    """The provider a bare fine-tune id belongs to: the registered one that claims its shape, else the one
    that takes unclaimed ids; the first available one where that is not among ``provider_keys``."""
    wanted = next((i.key for i in REGISTERED if i.owns_finetune_id and i.owns_finetune_id(finetune_id)), None)
    if wanted is None:
        wanted = next((i.key for i in REGISTERED if i.owns_finetune_id is None), provider_keys[0])
    return wanted if wanted in provider_keys else provider_keys[0]
