"""Per-client token buckets in process memory (login, callback, logout); bounded, pure and sync.

Imports only the standard library; must not import gateway.settings.
"""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """`burst` requests at once, then `rate_per_minute` a minute, per client key (IP address).

    At most `max_clients` buckets are kept: the least recently seen one is dropped first (it
    starts full again if that client returns). `now` is a monotonic clock reading in seconds.
    """

    def __init__(self, rate_per_minute: int, burst: int, max_clients: int = 10_000) -> None:
        if rate_per_minute < 1 or burst < 1 or max_clients < 1:
            raise ValueError("rate_per_minute, burst and max_clients must each be at least 1")
        self._per_second = rate_per_minute / 60.0
        self._burst = float(burst)
        self._max_clients = max_clients
        # key -> (tokens, time of that count); the order is least recently seen first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        """How many clients are tracked."""
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        tokens, then = self._buckets.get(key, (self._burst, now))
        # max(0, …): a clock that went back never takes tokens away.
        return min(self._burst, tokens + max(0.0, now - then) * self._per_second)

    def allow(self, key: str, now: float) -> bool:
        """Spend one token of `key`'s bucket; False (spend nothing) when it is empty."""
        tokens = self._tokens(key, now)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` has a token again (0.0 when it has one now)."""
        return max(0.0, (1.0 - self._tokens(key, now)) / self._per_second)
