"""Which provider a request may use: a visitor's own key, or the app's shared key on a budget."""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from services.caller import Caller
from services.config import Secret, Settings
from services.errors import InputError, RateLimitedError
from services.providers import registry
from services.providers.base import Provider


class RateLimiter:
    """At most ``limit`` calls per ``window`` seconds for each key (a sliding window).

    Memory is bounded: expired calls are dropped as keys are touched, and past ``max_keys``
    keys the least recently used is forgotten (a visitor minting keys to evict others gains
    nothing the global cap does not bound anyway)."""

    def __init__(self, limit: int, window: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._calls: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.RLock()

    def refusal(self, key: str, cost: int) -> float | None:
        """None if ``cost`` more calls fit now; else the seconds until they would."""
        with self._lock:
            calls = self._live(key)
            if len(calls) + cost <= self.limit:
                return None
            return self.window - (self._clock() - calls[0]) if calls else self.window

    def record(self, key: str, cost: int) -> None:
        with self._lock:
            calls = self._live(key)
            calls.extend([self._clock()] * cost)
            self._calls[key] = calls
            self._calls.move_to_end(key)
            while len(self._calls) > self.max_keys:
                self._calls.popitem(last=False)

    def used(self, key: str) -> int:
        with self._lock:
            return len(self._live(key))

    def remaining(self, key: str) -> int:
        return max(0, self.limit - self.used(key))

    def __len__(self) -> int:
        return len(self._calls)

    def _live(self, key: str) -> deque[float]:
        now = self._clock()
        calls = self._calls.get(key, deque())
        while calls and now - calls[0] >= self.window:
            calls.popleft()
        if not calls:
            self._calls.pop(key, None)
        return calls


class SharedKeyBudget:
    """Paid calls on the app owner's key, hosted: per visitor, per client address, and in all.

    A new cookie or session is a new visitor, so the per-visitor limit alone is no limit: the
    per-address and hourly caps bound what cookie churn can spend. All three are checked before
    any is charged, so a refused request costs nothing."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.visitor = RateLimiter(settings.shared_key_limit, clock=clock)
        self.address = RateLimiter(settings.shared_key_address_limit, clock=clock)
        self.everyone = RateLimiter(settings.shared_key_hourly_cap, clock=clock)
        self._lock = threading.Lock()

    def charge(self, owner: str, address: str, cost: int) -> None:
        with self._lock:
            checks = ((self.visitor, owner, "You have used this app's shared CometAPI key {used} times in the last "
                                            "hour; the limit is {limit} per visitor."),
                      (self.address, address, "Visitors from your network have used this app's shared CometAPI key "
                                              "{used} times in the last hour; the limit is {limit} per network."),
                      (self.everyone, "", "This app's shared CometAPI key has used its {limit} paid calls for this "
                                          "hour, for everyone."))
            for limiter, key, message in checks:
                wait = limiter.refusal(key, cost)
                if wait is not None:
                    raise RateLimitedError(
                        message.format(used=limiter.used(key), limit=limiter.limit)
                        + (f" This needs {cost} calls." if cost > 1 else ""),
                        hint=f"Try again in {max(1, round(wait / 60))} minute(s), or enter your own CometAPI key at "
                             "the top of the page.",
                        retry_after=wait)
            for limiter, key, _ in checks:
                limiter.record(key, cost)

    def remaining(self, owner: str, address: str) -> int:
        """How many paid calls this visitor may still make this hour."""
        with self._lock:
            return min(self.visitor.remaining(owner), self.address.remaining(address), self.everyone.remaining(""))


def _free() -> None:
    """The charge of a call the app's owner does not pay for."""


OWN_KEY_PROVIDERS = 256  # visitors' own-key (and own-token) providers kept open at once


class ProviderAccess:
    """Resolves the provider for one request.

    A visitor's own key (hosted mode) gets a provider of its own, built per request and kept
    nowhere. Without one, the app-wide provider is used; in hosted mode every paid call on the
    shared key is charged to ``SharedKeyBudget``, so no visitor can spend the owner's credits.
    """

    def __init__(self, settings: Settings, providers: dict[str, Provider],
                 own_makers: dict[str, Callable[[Secret], Provider]] | None = None,
                 budget: SharedKeyBudget | None = None) -> None:
        """``own_makers``: provider key -> a provider on a visitor's own credentials (their account pays):
        a pasted key or their Hugging Face sign-in, as the provider's ``Credentials.kind`` says."""
        self.settings = settings
        self.providers = providers
        self._makers = {key: make for key, make in (own_makers or {}).items() if key in providers}
        self.budget = budget or SharedKeyBudget(settings)
        # A visitor's own key or token -> its provider (and so its pooled connections), kept while in use.
        # Keyed by a hash of the secret, in memory only; the least recently used is closed past the cap.
        self._own: OrderedDict[str, Provider] = OrderedDict()
        self._own_lock = threading.Lock()

    def get(self, provider_key: str, owner: str, session_key: Secret | None, *, cost: int = 0,
            address: str = "", hf_token: Secret | None = None) -> Provider:
        """The provider to use; ``cost`` paid calls are charged to the shared-key budget at once.

        ``session_key``: the visitor's own key; ``hf_token``: their Hugging Face sign-in (hosted). A provider
        that takes them runs on the visitor's own account; one on a sign-in is the visitor's only when hosted.
        Without them the app-wide provider answers, and it says (``readiness``) what is needed: a sign-in
        never spends the Space owner's token."""
        provider, charge = self.resolve(provider_key, owner, session_key, cost=cost, address=address,
                                        hf_token=hf_token)
        charge()
        return provider

    def resolve(self, provider_key: str, owner: str, session_key: Secret | None, *, cost: int = 0,
                address: str = "", hf_token: Secret | None = None) -> tuple[Provider, Callable[[], None]]:
        """The provider to use (as ``get``), and the charge of ``cost`` paid calls to the shared-key
        budget, not yet made: a caller that checks a request after choosing its provider (a launch)
        charges once the checks have passed, so a refused request costs the visitor nothing. The charge
        raises RateLimitedError when the budget is spent; it is a no-op where the visitor pays."""
        if provider_key not in self.providers:
            raise InputError(f"Provider '{provider_key}' is not available in this app.",
                             hint=f"Pick one of: {', '.join(self.providers)}.")
        credentials = registry.credentials(provider_key)
        secret = {"own_key": session_key, "sign_in": hf_token}.get(credentials.kind)
        own = self.own_provider(provider_key, secret)
        if own is not None:
            return own, _free
        if credentials.shared_budget and self.settings.hosted and cost:
            return self.providers[provider_key], lambda: self.budget.charge(owner, address, cost)
        return self.providers[provider_key], _free

    def for_caller(self, provider_key: str, caller: Caller, *, cost: int = 0) -> Provider:
        """``get`` for one caller: their own key or sign-in where the provider takes it, their budget otherwise."""
        return self.get(provider_key, caller.owner, caller.cometapi_key, cost=cost, address=caller.address,
                        hf_token=caller.hf_token)

    def own_provider(self, provider_key: str, secret: Secret | None) -> Provider | None:
        """``provider_key`` on a visitor's own credentials (one per secret, reused across their requests);
        None without them, where it takes none, or for a sign-in outside hosted mode."""
        make = self._makers.get(provider_key)
        if not secret or make is None or provider_key not in self.providers:
            return None
        if registry.credentials(provider_key).kind == "sign_in" and not self.settings.hosted:
            return None
        return self._own_provider(provider_key, secret, make)

    def own(self, key: Secret) -> Provider:
        """The provider on a visitor's own key (the one provider that takes a pasted key)."""
        provider = next((p for k in self.providers if registry.credentials(k).kind == "own_key"
                         and (p := self.own_provider(k, key)) is not None), None)
        if provider is None:
            raise InputError("This app takes no visitor keys.")
        return provider

    def own_hf(self, token: Secret | None) -> Provider | None:
        """The provider on a signed-in visitor's Hugging Face token (hosted), None where there is none."""
        return next((p for k in self.providers if registry.credentials(k).kind == "sign_in"
                     and (p := self.own_provider(k, token)) is not None), None)

    def _own_provider(self, kind: str, secret: Secret, make: Callable[[Secret], Provider]) -> Provider:
        digest = kind + ":" + hashlib.sha256(secret.reveal().encode()).hexdigest()
        evicted = []
        with self._own_lock:
            provider = self._own.pop(digest, None) or make(secret)
            self._own[digest] = provider
            while len(self._own) > OWN_KEY_PROVIDERS:
                evicted.append(self._own.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return provider

    def close(self) -> None:
        with self._own_lock:
            providers, self._own = list(self._own.values()), OrderedDict()
        for provider in providers:
            provider.close()
