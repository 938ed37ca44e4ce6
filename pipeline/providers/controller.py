"""How many requests one provider may have in flight, and when it may be sent nothing at all.

`Controller` finds the concurrency a provider accepts and stays there. The configured `concurrency`
is its ceiling; it starts at 16 requests in flight (or the ceiling, when lower) and adds one slot
per success (TCP's slow start: the limit doubles each round trip) until the provider first refuses.
Starting lower costs more than it saves: a refusal is not billed and is retried at once, while each
round trip of ramp is a round trip of generations at reduced width (measured: starting at 4 and
adding one per success took the latency-bound benchmark from 0.97 to 0.92 of its ceiling).
Like TCP CUBIC, it then remembers where it was cut, `ceiling`, and plateaus there, probing one slot
above it only after a long run of successes at the ceiling, so the refusals that
probing costs stay a small share of the requests. Unlike CUBIC it cuts to the exact point of
refusal instead of a fixed fraction: a 429 for a request that was the n-th in flight says the
provider accepts fewer than n, so the ceiling becomes n - 1. That is what a relay's hidden per-key
in-flight cap looks like, and it converges in one step instead of AIMD's saw-tooth (which averages
about three quarters of the cap). Netflix's Vegas and Gradient2 limiters read rising latency
instead; image generation latency varies 5-30 s by itself, so a refusal is the clearer signal here.

A refusal at a level that has already succeeded (a random 429, not a cap) only lowers that
confidence: it takes two refusals at one level without a success between to cut there.

A 429 that says when to come back (`Retry-After`, Gemini's `retryDelay`) pauses the provider until
then, and it comes back with one request and a slow start up to its ceiling, which it leaves alone:
that is a rate quota, not a concurrency cap, and a sliding window frees its slots one by one.
Rate-limit headers on successful replies (`x-ratelimit-remaining-requests`,
`x-ratelimit-reset-requests`) give a budget for the window, less what is already in flight; once it
is spent nothing more is sent until the window resets, so the quota is paced before it runs out.
429s that a cut does not explain (at a level that had succeeded, or at one request in flight),
several in a row without a success, pause the provider briefly, doubling, so one that refuses
everything is not hammered; a single one, or a burst that finds a cap, does not stall it.

`Breaker` takes a provider out after several failures in a row (connection errors, timeouts, 5xx)
for a cool-down, then lets one probe request through before the provider gets its full share back.
The cool-down doubles each time the probe fails; a probe that succeeds starts it over (a provider
failing a steady quarter of its requests would otherwise climb to minutes-long outages).
"""

from __future__ import annotations

import time

START = 16  # slow start begins with this many requests in flight (or the ceiling, when lower)
PROBE_ROUNDS = 16  # successes at the ceiling, in multiples of the ceiling, before probing one above
THROTTLE_PAUSE_S = 0.05  # the first pause after two 429s in a row; doubles with each further one
PROBE_S = 1.0  # after a rate window resets, one request at a time for this long, until its reply tells
BREAKER_FAILURES = 5  # failures in a row that take a provider out
BREAKER_COOLDOWN_S = 2.0  # the first cool-down; doubles each time a probe fails
BREAKER_MAX_COOLDOWN_S = 240.0


class Controller:
    def __init__(self, maximum: int, pause_cap_s: float = 60.0) -> None:
        self.maximum = maximum
        self.ceiling = maximum  # where the provider last refused, less one (the configured ceiling at first)
        self.limit = min(START, maximum)
        self.in_flight = 0
        self.resume_at = 0.0  # monotonic time before which nothing is sent
        self._proven = 0  # the highest in-flight level that succeeded since the last cut
        self._streak = 0  # successes at the ceiling since the last change
        self._throttles = 0  # 429s in a row, without a success between
        self._pause_cap = pause_cap_s
        self._slow_start = True
        self._budget: int | None = None  # requests left in the provider's rate window, by its headers
        self._budget_until = 0.0  # when that window resets

    def room(self, now: float) -> int:
        """Requests that may be sent now."""
        if now < self.resume_at:
            return 0
        if self._budget is not None and now >= self._budget_until:
            # The window has moved on: one request finds out how far, before a burst that may not fit
            # (a sliding window frees one slot at a time). Without news in a second, all bets are off.
            probed = self._budget_until + PROBE_S > now
            self._budget, self._budget_until = (1, self._budget_until + PROBE_S) if probed else (None, 0.0)
        if self._budget is not None and self._budget <= 0:
            return 0
        return self.limit - self.in_flight

    def wakes_at(self) -> float:
        """When a pause, or an exhausted rate window, ends."""
        return max(self.resume_at, self._budget_until if self._budget is not None else 0.0)

    def sent(self) -> int:
        """One more in flight; returns its level (1 = the only one), to hand back with its outcome."""
        self.in_flight += 1
        if self._budget is not None:
            self._budget -= 1
        return self.in_flight

    def done(self) -> None:
        self.in_flight -= 1

    def succeeded(self, level: int, remaining: int | None = None, reset_s: float | None = None) -> None:
        self._throttles = 0
        # A level counts as proven up to the ceiling only: our count can run ahead of the provider's
        # (replies in transit), most of all in the burst before the first cut.
        self._proven = max(self._proven, min(level, self.ceiling))
        if remaining is not None and reset_s is not None:
            # What the window has left, less what is already on its way (counted or not, to be safe).
            self._budget = remaining - (self.in_flight - 1)
            self._budget_until = time.monotonic() + reset_s
        if self._slow_start:
            self.limit = min(self.ceiling, self.limit + 1)
            self._slow_start = self.limit < self.ceiling
            return
        self._streak += 1
        if self._streak >= PROBE_ROUNDS * self.ceiling and self.ceiling < self.maximum:
            self.ceiling += 1
            self.limit = self.ceiling
            self._streak = 0

    def throttled(self, level: int, retry_after: float | None) -> None:
        """A 429 for the request sent at in-flight `level`."""
        if retry_after is not None:  # a rate quota: come back then, one request first, and ramp up
            self._pause(retry_after)
            self.limit, self._slow_start = 1, True
            return
        if level > self._proven and level > 1:  # a cap: the provider takes fewer than `level`
            self.ceiling = min(self.ceiling, level - 1)
            self.limit = min(self.limit, self.ceiling)
            self._proven = min(self._proven, self.ceiling - 1)  # the new top is proven by successes only
            self._slow_start = False
            self._streak = 0
            return
        # Refused at a level that had succeeded (once is noise, twice a cut), or with nothing left to
        # cut: several in a row without a success pause the provider, doubling.
        self._proven = min(self._proven, level - 1)
        self._throttles += 1
        if self._throttles >= 2:
            self._pause(min(self._pause_cap, THROTTLE_PAUSE_S * 2.0 ** min(self._throttles - 2, 30)))

    def _pause(self, seconds: float) -> None:
        self.resume_at = max(self.resume_at, time.monotonic() + seconds)


class Breaker:
    def __init__(self) -> None:
        self.open_until = 0.0
        self.probing = False  # after a cool-down: one request decides
        self._failures = 0
        self._trips = 0  # trips since the last probe that succeeded

    def allows(self, now: float, in_flight: int) -> bool:
        if now < self.open_until:
            return False
        return not (self.probing and in_flight > 0)

    def succeeded(self) -> None:
        if self.probing:  # the provider is back: its next trip starts from the first cool-down again
            self._trips = 0
        self._failures = 0
        self.probing = False

    def failed(self) -> float | None:
        """A connection error, timeout or 5xx: the cool-down in seconds when this trips the breaker."""
        self._failures += 1
        if not (self.probing or self._failures >= BREAKER_FAILURES):
            return None
        cooldown = min(BREAKER_MAX_COOLDOWN_S, BREAKER_COOLDOWN_S * 2.0**self._trips)
        self._trips += 1
        self._failures = 0
        self.open_until = time.monotonic() + cooldown
        self.probing = True
        return cooldown
