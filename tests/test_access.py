"""Provider access: a visitor's own key versus the shared key with a per-visitor limit."""
from __future__ import annotations

import pytest

from services.access import ProviderAccess, RateLimiter
from services.config import Secret, Settings
from services.errors import InputError, RateLimitedError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Named:
    def __init__(self, name: str) -> None:
        self.key = "cometapi"
        self.name = name


def test_rate_limiter_sliding_window_per_owner():
    clock = Clock()
    limiter = RateLimiter(limit=2, window=60, clock=clock)
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(RateLimitedError, match="limit is 2") as exc:
        limiter.check("a")
    assert 0 < exc.value.retry_after <= 60
    limiter.check("b")  # another visitor has their own allowance
    clock.t = 61
    limiter.check("a")


def test_own_key_gets_its_own_provider_and_is_not_limited(tmp_path):
    settings = Settings(data_dir=tmp_path, hosted=True, cometapi_key=Secret("sk-owner"), shared_key_limit=0)
    made = []
    access = ProviderAccess(settings, {"cometapi": Named("shared")}, lambda k: made.append(k) or Named("own"))
    provider = access.get("cometapi", "session-x", Secret("sk-visitor"), cost=1)
    assert provider.name == "own" and made == [Secret("sk-visitor")]
    with pytest.raises(RateLimitedError, match="own CometAPI key"):
        access.get("cometapi", "session-x", None, cost=1)


def test_shared_key_unlimited_when_not_hosted(tmp_path):
    settings = Settings(data_dir=tmp_path, hosted=False, cometapi_key=Secret("sk-owner"), shared_key_limit=0)
    access = ProviderAccess(settings, {"cometapi": Named("shared")}, None)
    assert access.get("cometapi", "local", None, cost=5).name == "shared"


def test_unknown_provider(tmp_path):
    access = ProviderAccess(Settings(data_dir=tmp_path), {"cometapi": Named("shared")}, None)
    with pytest.raises(InputError, match="not available"):
        access.get("nope", "local", None)
