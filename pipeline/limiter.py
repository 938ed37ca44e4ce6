"""Adaptive concurrency for generation requests: the whole pool backs off together.

Additive increase, multiplicative decrease (AIMD), like TCP: a throttled reply halves the number of
requests allowed in flight, each success adds 1/limit, and the limit never exceeds the configured
`concurrency`. Throttles from requests sent before the last cut are ignored, so one burst of 429s
counts once instead of collapsing the pool to a single request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AdaptiveLimiter:
    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self._last_cut = 0.0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one request slot; yields the moment it was granted (pass it to `throttled`)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1
        try:
            yield time.monotonic()
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    async def succeeded(self) -> None:
        before = int(self.limit)
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        if int(self.limit) > before:
            async with self._changed:
                self._changed.notify_all()

    def throttled(self, granted_at: float) -> None:
        if granted_at >= self._last_cut:
            self.limit = max(1.0, self.limit / 2)
            self._last_cut = time.monotonic()
