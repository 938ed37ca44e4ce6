"""Adaptive concurrency for generation requests: the whole pool backs off together.

Additive increase, multiplicative decrease (AIMD), like TCP: a throttled reply (429) halves the
number of requests allowed in flight and pauses the whole pool (for the server's `Retry-After`, or
a pause that doubles with each throttle in a row); each success adds 1/limit back, never above the
configured `concurrency`. Throttles from requests sent before the last cut are ignored, so one burst
of 429s counts once instead of collapsing the pool to a single request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class AdaptiveLimiter:
    def __init__(self, maximum: int, pause_base_s: float = 1.0, pause_cap_s: float = 60.0) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self._pause_base, self._pause_cap = pause_base_s, pause_cap_s
        self._throttles = 0  # in a row, without a success between
        self._last_cut = 0.0
        self._resume_at = 0.0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one request slot; yields the moment it was granted (pass it to `throttled`)."""
        async with self._changed:
            while True:
                pause = self._resume_at - time.monotonic()
                if pause <= 0 and self.in_flight < int(self.limit):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), pause if pause > 0 else None)
            self.in_flight += 1
        try:
            yield time.monotonic()
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    async def succeeded(self) -> None:
        self._throttles = 0
        before = int(self.limit)
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        if int(self.limit) > before:
            async with self._changed:
                self._changed.notify_all()

    def throttled(self, granted_at: float, retry_after: float | None = None) -> None:
        if granted_at < self._last_cut:
            return
        now = time.monotonic()
        self.limit = max(1.0, self.limit / 2)
        self._last_cut = now
        self._throttles += 1
        pause = min(self._pause_cap, self._pause_base * 2 ** min(self._throttles - 1, 30))
        self._resume_at = max(self._resume_at, now + (retry_after if retry_after is not None else pause))
