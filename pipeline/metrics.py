"""A duration histogram in constant memory: fixed log-spaced buckets (each 25% wider), percentiles."""

from __future__ import annotations

import bisect

BOUNDS_MS = [0.01 * 1.25**k for k in range(90)]  # 0.01 ms up to about 9 minutes


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_MS) + 1)
        self.total = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS_MS, seconds * 1000)] += 1
        self.total += 1

    def percentile(self, fraction: float) -> float | None:
        """The upper bound, in ms, of the bucket holding that fraction of the samples."""
        if not self.total:
            return None
        rank, seen = fraction * self.total, 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return round(BOUNDS_MS[min(index, len(BOUNDS_MS) - 1)], 3)
        return None
