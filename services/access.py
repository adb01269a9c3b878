"""Which provider a request may use: a visitor's own key, or the app's shared key, rate-limited."""
from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable

from services.config import Secret, Settings
from services.errors import InputError, RateLimitedError
from services.providers import Provider


class RateLimiter:
    """At most ``limit`` calls per ``window`` seconds for each owner (a sliding window)."""

    def __init__(self, limit: int, window: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._calls: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, owner: str, cost: int = 1) -> None:
        now = self._clock()
        with self._lock:
            calls = self._calls[owner]
            while calls and now - calls[0] >= self.window:
                calls.popleft()
            if len(calls) + cost > self.limit:
                wait = self.window - (now - calls[0]) if calls else self.window
                raise RateLimitedError(
                    f"You have used this app's shared CometAPI key {len(calls)} times in the last "
                    f"{self.window / 3600:g} hour(s); the limit is {self.limit}.",
                    hint=f"Try again in {wait / 60:.0f} minutes, or enter your own CometAPI key at the top of the page.",
                    retry_after=wait,
                )
            calls.extend([now] * cost)


class ProviderAccess:
    """Resolves the provider for one request.

    A visitor's own key (hosted mode) gets a provider of its own, built per request and kept
    nowhere. Without one, the app-wide provider is used; in hosted mode the shared key is
    rate-limited per visitor so one visitor cannot spend the owner's credits.
    """

    def __init__(
        self,
        settings: Settings,
        providers: dict[str, Provider],
        with_key: Callable[[Secret], Provider] | None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self._with_key = with_key
        self.limiter = limiter or RateLimiter(settings.shared_key_limit)

    def get(self, provider_key: str, owner: str, session_key: Secret | None, *, cost: int = 0) -> Provider:
        """The provider to use; ``cost`` paid calls are counted against the shared-key limit."""
        if provider_key not in self.providers:
            raise InputError(f"Provider '{provider_key}' is not available in this app.",
                             hint=f"Pick one of: {', '.join(self.providers)}.")
        if provider_key == "cometapi" and session_key and self._with_key is not None:
            return self._with_key(session_key)
        if provider_key == "cometapi" and self.settings.hosted and cost:
            self.limiter.check(owner, cost)
        return self.providers[provider_key]
