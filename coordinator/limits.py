"""Per-sender rate limits, so one misbehaving device or client cannot swamp the coordinator."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Senders tracked at most; the least recently seen are forgotten beyond this.
MAX_SENDERS = 100_000


@dataclass
class RateLimiter:
    """A token bucket per sender: ``rate`` messages a second on average, bursts of ``burst``."""

    rate: float
    burst: float
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tokens, time

    def allow(self, sender: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True  # unlimited
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(sender, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[sender] = (tokens - 1.0 if ok else tokens, now)  # re-insert: most recent
        if len(self._buckets) > MAX_SENDERS:
            del self._buckets[next(iter(self._buckets))]
        return ok
