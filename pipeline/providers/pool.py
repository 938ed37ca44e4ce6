"""Many providers, one pool: each generation goes to the provider that should take it now.

Routing: the lowest `priority` among the providers with room (their controller's limit above their
in-flight count, not paused, breaker closed, under their `requests_per_minute`); among equal
priorities, the one with the most room. Lower priorities are used only while the higher ones are
full, throttled or down. Nothing is assigned in advance: an item waits for whichever provider frees
first, so a slow provider never holds work the others could take.

Failover: an answer that is fatal for a provider (bad key, no quota, a daily cap) disables that
provider for the rest of the run and the item goes to another at once (such a refusal is not
billed). A provider whose requests fail in a row is taken out by its circuit breaker for a
cool-down; one that has had no success for `max_outage_s` while its requests failed (5xx, timeouts,
resets, 429s: counted from its last success, or its first request after it, pauses included) is down
for the rest of the run. When no provider is left, `NoProviderLeft` says whether that is temporary
(one is down: try later) or not; every item stays as it was.

Suspects: a plain permanent error (a 400) may be the item's or the provider's (a model name the
relay does not know answers every item alike). The pool raises `Suspect` instead, and reports a
verdict on the provider's streak through `on_verdict`: the item's own fault once that provider
answers anything else, the provider's once the same error reaches `SAME_ERROR_STOP` items in a row
(it is then disabled) or the provider is taken out otherwise. The runner records or requeues.

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

from pipeline.catalog import Catalog, Tier
from pipeline.errors import ItemError, NoProviderLeft, PipelineError, RefusalError
from pipeline.events import EventKind
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.providers import Client, Generated
from pipeline.providers.controller import Breaker, Controller
from pipeline.retry import Verdict, for_provider

RATE_POLL_S = 0.05  # how often a provider held back by its requests_per_minute is looked at again


def served_tier(reply: str | None, asked: str | None) -> Tier:
    """The price tier of a reply: the tier it says served it (`usageMetadata.serviceTier`), else the one
    asked for."""
    said = (reply or asked or "standard").lower()
    return "flex" if said == "flex" else "standard"


class Suspect(PipelineError):
    """An item met a plain permanent error whose fault is not known yet: its provider's verdict comes
    through the pool's `on_verdict`."""

    def __init__(self, error: ItemError, provider: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.provider = provider


@dataclass
class ProviderStats:
    requests: int = 0
    images: int = 0
    refusals: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    cost_usd: float = 0.0
    disabled: str | None = None  # why the provider was taken out for the rest of the run
    down: bool = False  # taken out by an outage (it may come back later), not by its answers
    served: Counter[str] = field(default_factory=Counter)  # images made by another model than asked

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "images": self.images,
            "refusals": self.refusals,
            "errors": dict(self.errors),
            "cost_usd": round(self.cost_usd, 4),
            "disabled": self.disabled,
            "down": self.down,
            "served_by_other_models": dict(self.served),
        }


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
        self.streak: tuple[str, int] = ("", 0)  # the last plain permanent error, and items in a row
        self.share: int | None = None  # this worker's part of `concurrency`, when workers share it
        self.outage_from: float | None = None  # its first request since its last success
        self.last_error = ""  # since then, when one failed
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

    def wakes_at(self, now: float, max_outage_s: float) -> float | None:
        """When this provider may have room again without a request finishing, or is to be declared
        down, if it is waiting."""
        times = [t for t in (self.controller.wakes_at(), self.breaker.open_until) if t > now]
        if self.rate is not None and not self.rate.has_capacity():
            times.append(now + RATE_POLL_S)
        if self.last_error and self.outage_from is not None:
            times.append(max(now, self.outage_from + max_outage_s))
        return min(times) if times else None

    def is_down(self, now: float, max_outage_s: float) -> bool:
        """No success for `max_outage_s` while its requests failed."""
        return (
            bool(self.last_error) and self.outage_from is not None and now - self.outage_from >= max_outage_s
        )


class Pool:
    def __init__(
        self,
        members: list[Member],
        limit: int,
        on_event: Callable[[EventKind, str, str], None] = lambda *_: None,
        *,
        max_outage_s: float = 600.0,
        on_verdict: Callable[[str, bool], None] = lambda *_: None,
        catalog: Catalog | None = None,
    ) -> None:
        self.members = members
        self._limit = limit  # generation requests in flight over the whole pool
        self._in_flight = 0
        self._changed = asyncio.Condition()
        self._on_event = on_event  # (kind, provider, message): provider_disabled, provider_down
        self._on_verdict = on_verdict  # (provider, its fault): the end of a provider's streak of suspects
        self._max_outage_s = max_outage_s
        self._catalog = catalog or Catalog({})  # the models known: prices, replacements, aliases

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
        right before sending (False: send nothing, return None). Raises the item's ItemError, a
        `Suspect`, or NoProviderLeft."""
        while True:
            member, level = await self._acquire()
            try:
                if not gate():
                    return None
                member.stats.requests += 1
                try:
                    result = await member.client.generate(item)
                except ItemError as exc:
                    if self._failed(member, item, exc, level) is Verdict.DISABLE:
                        continue  # the provider's fault: another provider, or NoProviderLeft
                    raise
                self._succeeded(member, item, result, level)
                return result, member.name
            finally:
                await self._release(member)

    async def _acquire(self) -> tuple[Member, int]:
        async with self._changed:
            while True:
                now = time.monotonic()
                self._declare_outages(now)
                live = [m for m in self.members if not m.stats.disabled]
                if not live:
                    reasons = "; ".join(f"{m.name}: {m.stats.disabled}" for m in self.members)
                    temporary = any(m.stats.down for m in self.members)
                    raise NoProviderLeft(f"no provider left ({reasons})", temporary=temporary)
                rooms = [(m, m.room(now)) for m in live]
                ready = [(m, room) for m, room in rooms if room > 0]
                if ready and self._in_flight < self._limit:
                    member = min(ready, key=lambda pair: (pair[0].spec.priority, -pair[1]))[0]
                    if member.rate is not None:
                        await member.rate.acquire()
                    self._in_flight += 1
                    if member.outage_from is None:
                        member.outage_from = time.monotonic()
                    return member, member.controller.sent()
                wakes = [t for t in (m.wakes_at(now, self._max_outage_s) for m in live) if t is not None]
                timeout = max(0.0, min(wakes) - now) if wakes else None
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # meets a wake-up, and this loop would then wait for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()

    def disable(self, name: str, reason: str) -> None:
        """Take a provider out for the rest of the run (the runner found it misconfigured)."""
        for member in self.members:
            if member.name == name:
                self._disable(member, reason)

    def _declare_outages(self, now: float) -> None:
        for member in self.members:
            if not member.stats.disabled and member.is_down(now, self._max_outage_s):
                assert member.outage_from is not None
                member.stats.down = True
                self._disable(
                    member,
                    f"down: no success for {now - member.outage_from:.0f} s (max_outage_s"
                    f" {self._max_outage_s:g}); last error: {member.last_error}",
                )

    async def _release(self, member: Member) -> None:
        async with self._changed:
            member.controller.done()
            self._in_flight -= 1
            self._changed.notify_all()

    def _succeeded(self, member: Member, item: Item, result: Generated, level: int) -> None:
        member.controller.succeeded(level, result.remaining, result.reset_s)
        member.breaker.succeeded()
        member.outage_from, member.last_error = None, ""
        self._end_streak(member, provider_fault=False)
        member.stats.images += 1
        served, asked = result.served_model, member.spec.model or item.model
        if served and not self._catalog.same_model(asked, served):
            member.stats.served[served] += 1
            if sum(member.stats.served.values()) == 1:
                text = f"asked for {asked}, served by {served} (recorded as served_model)"
                self._on_event(EventKind.PROVIDER_REROUTED, member.name, text)
        member.stats.cost_usd += self._cost(member, item, result)

    def _cost(self, member: Member, item: Item, result: Generated) -> float:
        """USD for one image: the provider's price; else by the reply's token usage where the catalog
        has token prices; else the served model's list price at the tier that served it (0: unknown)."""
        if member.price is not None:
            return member.price
        model = self._catalog.find(result.served_model or item.model) or self._catalog.find(item.model)
        if model is None:
            return 0.0
        tier = served_tier(result.service_tier, member.spec.service_tier)
        by_tokens = model.token_cost(result.usage or {}, tier)
        return by_tokens if by_tokens is not None else model.price(item.image_size, tier) or 0.0

    def _failed(self, member: Member, item: Item, exc: ItemError, level: int) -> Verdict:
        """Counts the failure against its provider; raises Suspect for a plain permanent error whose
        fault is not known yet."""
        member.stats.errors[exc.kind] += 1
        if member.stats.disabled:  # sent before it was taken out: the item goes elsewhere
            return Verdict.DISABLE
        key = re.sub(r"\(request id: [^)]*\)", "", exc.message)
        same = member.streak[1] if member.streak[0] == key else 0
        verdict = for_provider(exc, same)
        if verdict is Verdict.THROTTLED:
            member.controller.throttled(level, exc.retry_after)
        elif verdict is Verdict.FAILING:
            cooldown = member.breaker.failed()
            if cooldown is not None:
                self._on_event(
                    EventKind.PROVIDER_DOWN, member.name, f"failing ({exc.message}): out for {cooldown:g} s"
                )
        else:  # it answered: alive
            member.breaker.succeeded()
            member.outage_from, member.last_error = None, ""
        if verdict in (Verdict.THROTTLED, Verdict.FAILING):
            member.last_error = exc.message
        elif verdict is Verdict.DISABLE:
            text = f"the same error on {same + 1} items in a row: {exc.message}" if same else exc.message
            self._disable(member, self._retired(member, item, exc) or text)
        elif verdict is Verdict.SUSPECT:
            if same == 0:
                self._end_streak(member, provider_fault=False)  # another error: the last streak was theirs
            member.streak = (key, same + 1)
            raise Suspect(exc, member.name)
        else:
            if isinstance(exc, RefusalError):
                member.stats.refusals += 1
            self._end_streak(member, provider_fault=False)
        return verdict

    def _retired(self, member: Member, item: Item, exc: ItemError) -> str | None:
        """The message for a model the provider no longer serves: which, and what replaces it."""
        if exc.kind != "model_retired":
            return None
        name = member.spec.model or item.model
        known = self._catalog.find(name)
        instead = (
            f"; the catalog's replacement: {known.entry.replacement}"
            if known and known.entry.replacement
            else ""
        )
        return f"model {name} is retired or unknown here ({exc.message}){instead}"

    def _end_streak(self, member: Member, provider_fault: bool) -> None:
        if member.streak[1]:
            member.streak = ("", 0)
            self._on_verdict(member.name, provider_fault)

    def _disable(self, member: Member, reason: str) -> None:
        if member.stats.disabled is None:
            member.stats.disabled = reason
            self._end_streak(member, provider_fault=True)
            self._on_event(EventKind.PROVIDER_DISABLED, member.name, reason)
