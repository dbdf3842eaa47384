"""A token bucket (Envoy's local rate limit): `rate` tokens a second, at most `burst` held.

Part of `engctl.daemon.admission`: pure, time is passed in. Imports the stdlib only.
"""

from __future__ import annotations


class TokenBucket:
    """Tokens refill continuously at `rate` per second up to `burst`; a request takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)  # a new bucket is full
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            tokens = self.tokens + (now - self.stamp) * self.rate
            self.tokens = tokens if tokens < self.burst else float(self.burst)
            self.stamp = now

    def has_token(self, now: float) -> bool:
        """Whether a token is there now (nothing taken)."""
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        """Take a token if one is there."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self, now: float, ahead: int = 0) -> float:
        """Seconds until a token is there for a request with `ahead` others waiting before it
        (0: one is there now)."""
        self._refill(now)
        need = ahead + 1.0 - self.tokens
        return need / self.rate if need > 0 else 0.0

    def next_token_at(self, now: float) -> float:
        """When the next whole token will be there (`now` if one is)."""
        return now + self.wait(now)

    def level(self, now: float) -> float:
        """Tokens held now."""
        self._refill(now)
        return self.tokens

    def resize(self, rate: float, burst: int, now: float) -> None:
        """New settings; the tokens held are kept (up to the new burst)."""
        self._refill(now)
        self.rate = rate
        self.burst = burst
        self.tokens = min(self.tokens, float(burst))
