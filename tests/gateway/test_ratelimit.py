"""RateLimiter: per-client token buckets with a burst, steady refill and a bounded client table."""

from __future__ import annotations

import pytest

from gateway.state.ratelimit import RateLimiter


def test_burst_is_allowed_then_refused() -> None:
    """`burst` requests pass at once; the next one is refused."""
    limiter = RateLimiter(rate_per_minute=60, burst=5)
    assert [limiter.allow("10.0.0.1", 100.0) for _ in range(6)] == [True] * 5 + [False]


def test_tokens_refill_at_the_rate() -> None:
    """One token comes back every 60/rate seconds, never more than the burst."""
    limiter = RateLimiter(rate_per_minute=30, burst=2)  # one token every 2 s
    assert limiter.allow("ip", 0.0)
    assert limiter.allow("ip", 0.0)
    assert not limiter.allow("ip", 1.0)
    assert limiter.allow("ip", 2.1)
    assert not limiter.allow("ip", 2.2)
    # A long pause refills to the burst, not beyond it.
    assert [limiter.allow("ip", 1000.0) for _ in range(3)] == [True, True, False]


def test_refused_requests_spend_nothing() -> None:
    """Hammering while empty does not push the next token further away."""
    limiter = RateLimiter(rate_per_minute=60, burst=1)
    assert limiter.allow("ip", 0.0)
    for i in range(50):
        assert not limiter.allow("ip", i * 0.01)
    assert limiter.allow("ip", 1.0)


def test_clients_have_separate_buckets() -> None:
    """One client's exhausted bucket does not limit another client."""
    limiter = RateLimiter(rate_per_minute=60, burst=1)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)


def test_retry_after_says_when_a_token_is_back() -> None:
    """retry_after is 0 with a token left, else the seconds until the next one."""
    limiter = RateLimiter(rate_per_minute=6, burst=1)  # one token every 10 s
    assert limiter.retry_after("ip", 0.0) == 0.0
    assert limiter.allow("ip", 0.0)
    assert limiter.retry_after("ip", 0.0) == pytest.approx(10.0)
    assert limiter.retry_after("ip", 4.0) == pytest.approx(6.0)
    assert limiter.retry_after("ip", 10.0) == 0.0


def test_client_table_is_bounded_and_drops_the_least_recent() -> None:
    """Beyond max_clients the least recently seen client is forgotten; recent ones stay limited."""
    limiter = RateLimiter(rate_per_minute=1, burst=1, max_clients=100)
    for i in range(1000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
        assert len(limiter) <= 100
    assert len(limiter) == 100
    assert not limiter.allow("10.0.3.231", 0.0)  # i = 999: seen last, still empty
    assert limiter.allow("10.0.0.0", 0.0)  # i = 0: forgotten, starts full again


def test_recent_use_protects_a_client_from_eviction() -> None:
    """A client seen again moves to the back of the eviction order."""
    limiter = RateLimiter(rate_per_minute=1, burst=1, max_clients=2)
    limiter.allow("old", 0.0)
    limiter.allow("mid", 0.0)
    assert not limiter.allow("old", 0.0)  # refused, but seen: now the most recent
    limiter.allow("new", 0.0)  # evicts "mid"
    assert not limiter.allow("old", 0.0)
    assert limiter.allow("mid", 0.0)


def test_a_clock_going_back_gives_no_tokens() -> None:
    """A `now` earlier than the last one neither refills nor fails."""
    limiter = RateLimiter(rate_per_minute=60, burst=1)
    assert limiter.allow("ip", 100.0)
    assert not limiter.allow("ip", 50.0)
    assert not limiter.allow("ip", 50.5)


@pytest.mark.parametrize(("rate", "burst", "clients"), [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_nonsense_limits_are_refused(rate: int, burst: int, clients: int) -> None:
    """A zero rate, burst or table size is a ValueError, not a limiter that refuses all."""
    with pytest.raises(ValueError, match="at least 1"):
        RateLimiter(rate, burst, clients)
