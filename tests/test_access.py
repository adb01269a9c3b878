"""Provider access: a visitor's own key versus the shared key with a per-visitor limit."""
from __future__ import annotations

import pytest

from services.access import ProviderAccess, RateLimiter
from services.providers.base import ProviderBase
from services.config import Secret, Settings
from services.errors import InputError, RateLimitedError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Named(ProviderBase):
    def __init__(self, name: str) -> None:
        self.key = "cometapi"
        self.name = name


def test_rate_limiter_sliding_window_per_owner():
    clock = Clock()
    limiter = RateLimiter(limit=2, window=60, clock=clock)
    assert limiter.refusal("a", 2) is None
    limiter.record("a", 2)
    clock.t = 10
    assert limiter.refusal("a", 1) == 50  # the oldest call leaves the window in 50 s
    assert limiter.refusal("b", 2) is None and limiter.remaining("a") == 0  # another has their own allowance
    clock.t = 61
    assert limiter.refusal("a", 2) is None and limiter.remaining("a") == 2


def test_own_key_gets_its_own_provider_and_is_not_limited(tmp_path):
    settings = Settings(data_dir=tmp_path, hosted=True, cometapi_key=Secret("sk-owner"), shared_key_limit=0)
    made = []
    access = ProviderAccess(settings, {"cometapi": Named("shared")},
                            {"cometapi": lambda k: made.append(k) or Named("own")})
    provider = access.get("cometapi", "session-x", Secret("sk-visitor"), cost=1)
    assert provider.name == "own" and made == [Secret("sk-visitor")]
    with pytest.raises(RateLimitedError, match="own CometAPI key"):
        access.get("cometapi", "session-x", None, cost=1)


def test_shared_key_unlimited_when_not_hosted(tmp_path):
    settings = Settings(data_dir=tmp_path, hosted=False, cometapi_key=Secret("sk-owner"), shared_key_limit=0)
    access = ProviderAccess(settings, {"cometapi": Named("shared")})
    assert access.get("cometapi", "local", None, cost=5).name == "shared"


def test_unknown_provider(tmp_path):
    access = ProviderAccess(Settings(data_dir=tmp_path), {"cometapi": Named("shared")})
    with pytest.raises(InputError, match="not available"):
        access.get("nope", "local", None)


def _budget(clock, **limits):
    from services.access import SharedKeyBudget

    return SharedKeyBudget(Settings(**limits), clock=clock)


def test_cookie_churn_is_capped_per_address_and_everyone_is_capped_in_all():
    clock = Clock()
    budget = _budget(clock, shared_key_limit=3, shared_key_address_limit=6, shared_key_hourly_cap=10)
    # One person minting a new visitor identity per call, from one address: 6 calls, not unlimited.
    spent = 0
    for i in range(20):
        try:
            budget.charge(f"visitor-{i}", "10.0.0.1", 1)
            spent += 1
        except RateLimitedError as exc:
            assert "from your network" in str(exc) and "limit is 6 per network" in str(exc)
    assert spent == 6
    # Many addresses: the hourly cap for everyone holds.
    for i in range(4):
        budget.charge(f"other-{i}", f"10.0.1.{i}", 1)
    with pytest.raises(RateLimitedError, match="for everyone"):
        budget.charge("late", "10.0.2.1", 1)
    clock.t = 3601
    budget.charge("late", "10.0.2.1", 1)


def test_a_refused_charge_costs_nothing_and_remaining_says_what_is_left():
    clock = Clock()
    budget = _budget(clock, shared_key_limit=5, shared_key_address_limit=100, shared_key_hourly_cap=100)
    assert budget.remaining("ann", "a") == 5
    budget.charge("ann", "a", 4)
    with pytest.raises(RateLimitedError, match="This needs 2 calls"):
        budget.charge("ann", "a", 2)  # a two-image caption run that does not fit is not half-charged
    assert budget.remaining("ann", "a") == 1
    budget.charge("ann", "a", 1)
    assert budget.remaining("ann", "a") == 0


def test_the_limiters_memory_is_bounded():
    clock = Clock()
    limiter = RateLimiter(limit=5, window=60, clock=clock, max_keys=100)
    for i in range(10_000):
        limiter.record(f"churn-{i}", 1)
    assert len(limiter) == 100
    clock.t = 61
    limiter.record("fresh", 1)
    assert limiter.used("churn-9999") == 0 and len(limiter) <= 100


def test_one_provider_per_visitor_key_reused_and_closed_past_the_cap(tmp_path, monkeypatch):
    import services.access as access_module

    monkeypatch.setattr(access_module, "OWN_KEY_PROVIDERS", 2)
    made: list = []

    class Own(Named):
        closed = False

        def close(self):
            self.closed = True

    def with_key(key):
        made.append(Own(key.reveal()))
        return made[-1]

    access = ProviderAccess(Settings(data_dir=tmp_path, hosted=True), {"cometapi": Named("shared")},
                            {"cometapi": with_key})
    first = access.get("cometapi", "ann", Secret("sk-ann"))
    assert access.get("cometapi", "ann", Secret("sk-ann")) is first and len(made) == 1  # reused, not rebuilt
    access.get("cometapi", "bob", Secret("sk-bob"))
    access.get("cometapi", "cy", Secret("sk-cy"))  # a third key: the least recently used one is closed
    assert first.closed and not made[1].closed and not made[2].closed
    access.close()
    assert all(p.closed for p in made)


def test_resolve_chooses_the_provider_now_and_charges_only_when_asked(tmp_path):
    """A launch picks its provider before it checks its form, and charges after: resolve's charge."""
    settings = Settings(data_dir=tmp_path, hosted=True, cometapi_key=Secret("sk-owner"), shared_key_limit=1)
    access = ProviderAccess(settings, {"cometapi": Named("shared")}, {"cometapi": lambda k: Named("own")})
    provider, charge = access.resolve("cometapi", "ann", None, cost=1, address="a")
    assert provider.name == "shared" and access.budget.visitor.used("ann") == 0  # chosen, not yet charged
    charge()
    assert access.budget.visitor.used("ann") == 1
    with pytest.raises(RateLimitedError):
        access.resolve("cometapi", "ann", None, cost=1, address="a")[1]()
    own, free = access.resolve("cometapi", "ann", Secret("sk-ann"), cost=1, address="a")
    free()  # the visitor's own key: nothing to charge, however often
    free()
    assert own.name == "own" and access.budget.visitor.used("ann") == 1
