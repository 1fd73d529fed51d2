"""Rate limits of WHEP offers: a token bucket per client address (a peer costs far more than an
HTTP listener, and the peer limit is shared)."""

from __future__ import annotations


class OfferBuckets:
    """A token bucket per client address: `rate` offers a second, `burst` at once."""

    MAX_ADDRESSES = 10_000

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = max(rate, 1e-6)
        self.burst = float(max(burst, 1))
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, at)

    def take(self, addr: str, now: float) -> float:
        """0 when an offer may go ahead, else the seconds until it may."""
        tokens, at = self.buckets.get(addr, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self.buckets[addr] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self.buckets) >= self.MAX_ADDRESSES and addr not in self.buckets:
            full = self.burst / self.rate  # a bucket untouched this long is full: forget it
            self.buckets = {a: v for a, v in self.buckets.items() if now - v[1] < full}
        self.buckets[addr] = (tokens - 1.0, now)
        return 0.0
