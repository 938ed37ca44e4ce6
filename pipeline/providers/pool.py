"""Many providers, one pool: each generation goes to the provider that should take it now.

Routing: the lowest `priority` among the providers with room (their controller's limit above their
in-flight count, not paused, breaker closed, under their `requests_per_minute`); among equal
priorities, the one with the most room. Lower priorities are used only while the higher ones are
full, throttled or down. Nothing is assigned in advance: an item waits for whichever provider frees
first, so a slow provider never holds work the others could take.

Failover: an answer that is fatal for a provider (bad key, no quota, the same permanent error on ten
items in a row) disables that provider for the rest of the run and the item goes to another at
once (such a refusal is not billed); only when none is left is it fatal for the run. A provider whose
requests fail in a row is taken out by its circuit breaker for a cool-down.

Each provider's figures (requests, images, refusals, errors by kind, cost) are kept for the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiolimiter import AsyncLimiter

from pipeline.errors import FatalError, ItemError, PermanentError, RefusalError
from pipeline.manifest import Item, ProviderSpec
from pipeline.presets import list_price
from pipeline.providers import Client, Generated
from pipeline.providers.controller import Breaker, Controller

SAME_ERROR_STOP = 10  # this many items in a row failing with one permanent error: a configuration problem
TRANSIENT = frozenset({"network", "timeout", "server_error"})  # what the circuit breaker counts
RATE_POLL_S = 0.05  # how often a provider held back by its requests_per_minute is looked at again


@dataclass
class ProviderStats:
    requests: int = 0
    images: int = 0
    refusals: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    disabled: str | None = None  # why the provider was taken out for the rest of the run

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "images": self.images, "refusals": self.refusals,
            "errors": dict(self.errors), "cost_usd": round(self.cost_usd, 4), "disabled": self.disabled,
        }  # fmt: skip


class Member:
    """One provider of the pool, with its controller, breaker and figures."""

    def __init__(self, spec: ProviderSpec, client: Client, price: float | None, pause_cap_s: float) -> None:
        self.spec = spec
        self.client = client
        self.price = price  # USD per image; None: the model's list price
        self.controller = Controller(spec.concurrency, pause_cap_s)
        self.breaker = Breaker()
        self.rate = AsyncLimiter(1, 60.0 / spec.requests_per_minute) if spec.requests_per_minute else None
        self.stats = ProviderStats()
        self.repeated: tuple[str, int] = ("", 0)  # the last permanent error, and items in a row
        self.share: int | None = None  # this worker's part of `concurrency`, when workers share it
        self._workers = 1  # the workers its requests_per_minute is split among

    def take_share(self, share: int, workers: int) -> None:
        """This worker's part of the provider's limits: `share` requests in flight, and an even part
        of its requests_per_minute (a new limiter only when the number of workers changed)."""
        self.share = share
        rpm = self.spec.requests_per_minute
        if rpm and workers != self._workers:
            self._workers = workers
            self.rate = AsyncLimiter(1, 60.0 * workers / rpm)

    @property
    def name(self) -> str:
        return self.spec.name

    def room(self, now: float) -> int:
        if self.stats.disabled or not self.breaker.allows(now, self.controller.in_flight):
            return 0
        if self.rate is not None and not self.rate.has_capacity():
            return 0
        room = self.controller.room(now)
        return room if self.share is None else min(room, self.share - self.controller.in_flight)

    def wakes_at(self, now: float) -> float | None:
        """When this provider may have room again without a request finishing, if it is waiting."""
        times = [t for t in (self.controller.wakes_at(), self.breaker.open_until) if t > now]
        if self.rate is not None and not self.rate.has_capacity():
            times.append(now + RATE_POLL_S)
        return min(times) if times else None


class Pool:
    def __init__(
        self, members: list[Member], limit: int, on_event: Callable[[str, str, str], None] = lambda *_: None
    ) -> None:
        self.members = members
        self._limit = limit  # generation requests in flight over the whole pool
        self._in_flight = 0
        self._changed = asyncio.Condition()
        self._on_event = on_event  # (kind, provider, message): provider_disabled, provider_down

    def stats(self) -> dict[str, dict[str, Any]]:
        return {m.name: m.stats.as_dict() for m in self.members}

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def share(self, shares: dict[str, int], workers: int) -> None:
        """Take this worker's shares of the limits (key "" is the pool's): see pipeline.state.postgres."""
        async with self._changed:
            self._limit = shares[""]
            for member in self.members:
                member.take_share(shares[member.name], workers)
            self._changed.notify_all()

    async def generate(self, item: Item, gate: Callable[[], bool]) -> tuple[Generated, str] | None:
        """One generation on the best provider: its reply and the provider's name. `gate()` is asked
        right before sending (False: send nothing, return None). Raises the item's ItemError, or
        FatalError when no provider is left."""
        while True:
            member, level = await self._acquire()
            try:
                if not gate():
                    return None
                member.stats.requests += 1
                try:
                    result = await member.client.generate(item)
                except FatalError as exc:
                    member.stats.errors[exc.kind] += 1
                    self._disable(member, exc.message)
                    continue
                except ItemError as exc:
                    self._failed(member, exc, level)
                    raise
                self._succeeded(member, item, result, level)
                return result, member.name
            finally:
                await self._release(member)

    async def _acquire(self) -> tuple[Member, int]:
        async with self._changed:
            while True:
                now = time.monotonic()
                live = [m for m in self.members if not m.stats.disabled]
                if not live:
                    reasons = "; ".join(f"{m.name}: {m.stats.disabled}" for m in self.members)
                    raise FatalError(f"no provider left ({reasons})")
                rooms = [(m, m.room(now)) for m in live]
                ready = [(m, room) for m, room in rooms if room > 0]
                if ready and self._in_flight < self._limit:
                    member = min(ready, key=lambda pair: (pair[0].spec.priority, -pair[1]))[0]
                    if member.rate is not None:
                        await member.rate.acquire()
                    self._in_flight += 1
                    return member, member.controller.sent()
                wakes = [t for t in (m.wakes_at(now) for m in live) if t is not None]
                timeout = max(0.0, min(wakes) - now) if wakes else None
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # meets a wake-up, and this loop would then wait for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()

    async def _release(self, member: Member) -> None:
        async with self._changed:
            member.controller.done()
            self._in_flight -= 1
            self._changed.notify_all()

    def _succeeded(self, member: Member, item: Item, result: Generated, level: int) -> None:
        member.controller.succeeded(level, result.remaining, result.reset_s)
        member.breaker.succeeded()
        member.repeated = ("", 0)
        member.stats.images += 1
        member.stats.cost_usd += (
            member.price if member.price is not None else list_price(item.model, item.image_size)
        )

    def _failed(self, member: Member, exc: ItemError, level: int) -> None:
        member.stats.errors[exc.kind] += 1
        if isinstance(exc, RefusalError):
            member.stats.refusals += 1
        if exc.kind == "rate_limited":
            member.controller.throttled(level, exc.retry_after)
        elif exc.kind in TRANSIENT:
            cooldown = member.breaker.failed()
            if cooldown is not None:
                self._on_event(
                    "provider_down", member.name, f"failing ({exc.message}): out for {cooldown:g} s"
                )
        else:
            member.breaker.succeeded()  # it answered: alive
        if type(exc) is PermanentError:
            self._count_repeats(member, exc.message)
        else:
            member.repeated = ("", 0)

    def _count_repeats(self, member: Member, message: str) -> None:
        """The same permanent error on item after item means a bad configuration: stop paying for it."""
        key = re.sub(r"\(request id: [^)]*\)", "", message)
        count = member.repeated[1] + 1 if member.repeated[0] == key else 1
        member.repeated = (key, count)
        if count >= SAME_ERROR_STOP:
            self._disable(member, f"the same error on {count} items in a row: {message}")

    def _disable(self, member: Member, reason: str) -> None:
        if member.stats.disabled is None:
            member.stats.disabled = reason
            self._on_event("provider_disabled", member.name, reason)
