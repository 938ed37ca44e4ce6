"""The online run: plan each item, generate, download, record; never pay twice for an image.

Items stream from the manifest one at a time; a slot is taken before an item's task is created, so a
million-item manifest is never a million tasks. There are as many slots as downloads may be in
flight, and generation requests are further bounded by the provider pool (`pipeline.providers`:
each provider's controller, and the pool's total). A download never holds a generation slot and,
since its item already holds a slot, starts the moment its URL arrives (URLs expire: when downloads
are slow, it is generation that waits, never a paid URL). Each item's life is one coroutine; what to
do after a failure is `pipeline.retry`'s decision, and what happened is written by the run core's
`Recorder`. The core never prints: it reports through `on_event` and the returned `Summary`.

An item whose permanent error its provider may be to blame for (`Suspect`) ends without a record
until the pool's verdict: its own fault (recorded failed), or the provider's (the item is taken up
again, by another provider, or left resumable when none is left). Suspects still open when every
item has been looked at and nothing is in flight are the items' own.

With a shared state (`pipeline.state.postgres`) many such runners, anywhere, work on one output:
items are claimed in small chunks as they are reached (those another worker holds are tried again
later, so a dead worker's items are taken over once its leases run out), a heartbeat renews the
leases and sets this worker's share of every limit, and every write is fenced by the item's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
import time
from collections import defaultdict

import aiohttp
from aiolimiter import AsyncLimiter

from pipeline.core import RunCore
from pipeline.download import Downloader, StoredImage, stored_image
from pipeline.errors import DownloadError, ItemError, LeaseLost, NoProviderLeft
from pipeline.events import EventKind
from pipeline.healthcheck import ping
from pipeline.imagefile import EXTENSIONS
from pipeline.item import Item
from pipeline.manifest import iter_items
from pipeline.plan import Step, step_of
from pipeline.providers import Generated, connect
from pipeline.providers.pool import Member, Pool, Suspect
from pipeline.recorder import STORAGE_ERRORS
from pipeline.retry import for_item
from pipeline.state import Row

CLAIM_EVERY = 32  # items looked at, and claimed, at a time
DOWNLOAD_TRIES = 3
YIELD_EVERY = 256  # planning items that need nothing gives the event loop a turn this often


class Runner(RunCore):
    """The online mode: every item through the provider pool, as it is reached."""

    async def _work(self) -> None:
        manifest = self.manifest
        rpm = manifest.requests_per_minute if manifest.providers else None  # else the default provider's
        self._rpm = rpm
        self._workers = 1  # live workers sharing the limits (a shared state)
        self._rate = AsyncLimiter(1, 60.0 / rpm) if rpm else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._nudge = asyncio.Event()  # an item ended, or was handed back: the feed looks again
        self._suspects: defaultdict[str, list[tuple[Item, ItemError, int]]] = defaultdict(list)
        self._requeued: list[Item] = []
        limit = manifest.items_in_flight
        self._slots = Slots(limit)
        connector = aiohttp.TCPConnector(limit=limit + 4)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            self._pool = self._build_pool(session)
            self._downloader = Downloader(
                session,
                self.store,
                max_bytes=int(manifest.download_max_mb * 1_000_000),
                timeout_s=max(e.spec.timeout_s for e in self.options.endpoints),
            )
            healthcheck = manifest.healthcheck_url
            await ping(session, healthcheck, "/start")
            helpers = [asyncio.create_task(self._watchdog())]
            if self._state.shared:
                self._seed()
                self._state.register()
                await self._take_shares()
                helpers.append(asyncio.create_task(self._heartbeat()))
            try:
                await self._feed(self._slots)
            finally:
                self.summary.providers = self._pool.stats()
                for helper in helpers:
                    helper.cancel()
                self._downloader.close()
                await self.recorder.commit()
                await ping(session, healthcheck, "" if self.summary.exit_code == 0 else "/fail")

    def interrupt(self, signum: int) -> None:
        """A signal: the first stops as `stop` does, a second cancels in-flight work at once."""
        if self.summary.signal is not None:
            self._cancel_all()
        super().interrupt(signum)

    def _cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()

    def _build_pool(self, session: aiohttp.ClientSession) -> Pool:
        manifest = self.manifest
        members = [
            Member(
                e.spec,
                connect(e.spec, session, e.base_url, e.key, manifest.catalog),
                e.spec.price_per_image if e.spec.price_per_image is not None else manifest.price_per_image,
                manifest.backoff_cap_s,
            )
            for e in self.options.endpoints
        ]
        return Pool(
            members,
            manifest.generation_limit,
            self._provider_event,
            max_outage_s=manifest.max_outage_s,
            on_verdict=self._verdict,
            catalog=manifest.catalog,
        )

    def _misconfigured(self, provider: str, why: str) -> None:
        self._pool.disable(provider, f"misconfigured: {why}")

    def _provider_event(self, kind: EventKind, provider: str, message: str) -> None:
        self.summary.warnings += 1
        self._emit(kind, None, message, provider)

    def _verdict(self, provider: str, provider_fault: bool) -> None:
        """The end of a provider's streak of suspects: taken up again, or recorded as the items' own."""
        suspects = self._suspects.pop(provider, [])
        if provider_fault:
            self._requeued += [item for item, _, _ in suspects]
            self._nudge.set()
            return
        for item, error, attempts in suspects:
            self.recorder.fail(item, error, attempts, provider)

    async def _feed(self, slots: Slots) -> None:
        """Every item in manifest order, a chunk at a time; then the items handed back by a verdict,
        and, with a shared state, the items other workers held when this one looked, until each is
        settled (by them, or taken over); last, the suspects no verdict came for."""
        async with asyncio.TaskGroup() as group:
            held: list[Item] = []
            chunk = CLAIM_EVERY if self._state.shared else YIELD_EVERY
            items = iter(iter_items(self.manifest))
            while (batch := list(itertools.islice(items, chunk))) and not self._stopping.is_set():
                await asyncio.sleep(0)  # skipping done items must not starve signals and work
                held += await self._take(batch, slots, group)
            while not self._stopping.is_set():
                if self._requeued:
                    batch, self._requeued = self._requeued, []
                    held += await self._take(batch, slots, group)
                elif held:
                    await self._pause(self._state.heartbeat_s)
                    held = await self._take(held, slots, group)
                elif self._tasks:
                    self._nudge.clear()
                    await self._nudge.wait()
                elif self._suspects:
                    for provider in list(self._suspects):
                        self._verdict(provider, provider_fault=False)
                else:
                    return

    async def _take(self, items: list[Item], slots: Slots, group: asyncio.TaskGroup) -> list[Item]:
        """Start the items that need work, each once it has a slot and (with a shared state) once this
        worker has claimed it; returns those another worker holds. Slots come first: a claimed item
        never waits for one, so no item is kept from the other workers while this one is busy."""
        looked = zip(items, self._state.rows(items), strict=True)
        wanted = [(item, row, step) for item, row in looked if (step := self._work_step(item, row))]
        held: list[Item] = []
        queue = iter(wanted)
        while not self._stopping.is_set() and (first := next(queue, None)) is not None:
            await slots.acquire()
            batch = [first]
            while len(batch) < CLAIM_EVERY and slots.try_acquire():
                if (more := next(queue, None)) is None:
                    slots.release()
                    break
                batch.append(more)
            granted: list[tuple[Item, Row | None, Step | None]] = list(batch)
            if self._state.shared:  # decided again on the row as claimed: another may have settled it
                claimed = self._state.claim([(item, row) for item, row, _ in batch])
                granted = [(item, row, self._work_step(item, row)) for item, row in claimed]
            taken = {item.name for item, _, _ in granted}
            held += [item for item, _, _ in batch if item.name not in taken]
            settled = [item for item, _, step in granted if step is None]
            self._state.release(settled)  # finished by another worker since we looked
            for _ in range(len(batch) - len(granted) + len(settled)):
                slots.release()
            for item, row, step in granted:
                if step is not None:
                    task = group.create_task(self._process(item, step, row))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(lambda _: slots.release())
                    task.add_done_callback(lambda _: self._nudge.set())
        return held

    def _seed(self) -> None:
        """The manifest's items into the shared state, by the first worker; the others wait for it."""
        digest = hashlib.sha256()
        for item in iter_items(self.manifest):
            digest.update(f"{item.name}\x1f{item.fingerprint}\n".encode())
        self._state.seed(lambda: iter_items(self.manifest), digest.hexdigest())

    def _work_step(self, item: Item, row: Row | None) -> Step | None:
        """What the item needs, or None when it needs nothing: then it is counted as skipped or failed."""
        step = step_of(item, row, self.store, self.manifest.url_ttl_s, self.options.retry_failed)
        if step is Step.DONE:
            self.summary.skipped += 1
        elif step is Step.FAILED and row:
            self.summary.failed[row.error_type or "error"] += 1
        return None if step in (Step.DONE, Step.FAILED) else step

    def _limits(self) -> dict[str, int]:
        """The limits shared by the workers: the pool's, and each provider's concurrency."""
        return {"": self.manifest.generation_limit} | {m.name: m.spec.concurrency for m in self._pool.members}

    async def _take_shares(self) -> None:
        in_flight = {"": self._pool.in_flight} | {m.name: m.controller.in_flight for m in self._pool.members}
        shares, workers = self._state.heartbeat(self._limits(), in_flight)
        await self._pool.share(shares, workers)
        # Items in flight in proportion to this worker's part of the generation limit.
        self._slots.resize(
            math.ceil(self.manifest.items_in_flight * shares[""] / self.manifest.generation_limit)
        )
        if self._rpm and workers != self._workers:  # the pool's requests_per_minute, split evenly
            self._workers = workers
            self._rate = AsyncLimiter(1, 60.0 * workers / self._rpm)

    async def _heartbeat(self) -> None:
        """Renew the leases and retake this worker's shares, until the run ends."""
        while True:
            await asyncio.sleep(self._state.heartbeat_s)
            try:
                await self._take_shares()
            except STORAGE_ERRORS as exc:
                self._storage_failed(exc)
                return

    async def _watchdog(self) -> None:
        """Stops the run at --max-duration; cancels what is left when the grace period ends."""
        limit = self.options.max_duration_s
        if limit is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await self._stopping.wait()
            self.stop("max_duration")
        await self._stopping.wait()
        await asyncio.sleep(self.options.grace_s)
        self._cancel_all()

    async def _process(self, item: Item, step: Step, row: Row | None) -> None:
        try:
            await self._work_item(item, step, row)
        except LeaseLost as exc:
            self.summary.handed_over += 1
            self._emit(EventKind.WARNING, item, str(exc))
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)

    async def _work_item(self, item: Item, step: Step, row: Row | None) -> None:
        old_file = row.file if row else None
        provider = row.provider if row else None  # who generated a recorded URL
        if step in (Step.DOWNLOAD, Step.ADOPT) and await self._adopt(item, old_file, provider):
            return
        ref = row.url if step is Step.DOWNLOAD and row else None
        received_at = time.monotonic()
        attempts = throttles = 0
        provenance: dict[str, str | None] = {}  # what the reply said of itself
        while True:
            if ref is None:
                try:
                    generated = await self._generate(item)
                except Suspect as suspect:  # recorded, or taken up again, on its provider's verdict
                    self._suspects[suspect.provider].append((item, suspect.error, attempts + 1))
                    return
                except NoProviderLeft as exc:
                    self._no_provider(exc)
                    return
                except ItemError as exc:
                    decision = for_item(exc, attempts, throttles, self.manifest.max_attempts)
                    throttles += not decision.costs_attempt
                    attempts += decision.costs_attempt
                    if await self._follow(item, exc, decision, attempts):
                        continue
                    return
                if generated is None:
                    return  # the run is stopping; the item stays resumable
                result, provider = generated
                ref = result.refs[0]
                provenance = {"served_model": result.served_model, "service_tier": result.service_tier}
                attempts += 1
                received_at = time.monotonic()
                self.recorder.generated(
                    item, ref if not ref.startswith("data:") else None, attempts, provider
                )
            try:
                stored = await self._download(item, ref, received_at, old_file)
            except ItemError as exc:
                ref = None
                # The attempt that paid for this reference failed: decided as that attempt's failure.
                decision = for_item(exc, attempts - 1, 0, self.manifest.max_attempts)
                if await self._follow(item, exc, decision, attempts):
                    continue
                return
            await self.recorder.image(item, stored, old_file, provider, provenance)
            return

    def _may_send(self) -> bool:
        """Asked right before each paid request: counts it, unless the run may send no more."""
        budget = self.options.max_requests
        if budget is not None and self.summary.requests >= budget:
            self.stop("max_requests")
        if self._stopping.is_set():
            return False
        self.summary.requests += 1
        return True

    async def _generate(self, item: Item) -> tuple[Generated, str] | None:
        """One paid request: its reply and the provider that made it, or None when the run may send
        no more."""
        if self._rate:
            await self._rate.acquire()
        return await self._pool.generate(item, self._may_send)

    async def _download(self, item: Item, ref: str, received_at: float, old_file: str | None) -> StoredImage:
        for tries in range(1, DOWNLOAD_TRIES + 1):
            try:
                if tries == 1:
                    self.summary.download_wait.add(time.monotonic() - received_at)
                stored = await self._downloader.fetch(
                    ref,
                    item.name,
                    replace=not self._state.shared or old_file is not None,
                    guard=lambda: self._state.holds(item),
                )
                self.summary.downloads += 1
                return stored
            except DownloadError as exc:
                if tries == DOWNLOAD_TRIES:
                    raise
                self.summary.retries[exc.kind] += 1
                await asyncio.sleep(self._backoff(tries))
        raise AssertionError("unreachable")

    async def _adopt(self, item: Item, old_file: str | None, provider: str | None) -> bool:
        """A file that landed before a crash lost its state write: verify it and take it."""
        recorded = self._state.image_sha256(item)  # the previous image, if any: not a new one
        # Exact names only: ids may hold dots, so a glob `<name>.*` could match another item's file.
        candidates = (f"images/{item.name}.{ext}" for ext in EXTENSIONS.values())
        for relative in (candidate for candidate in candidates if self.store.exists(candidate)):
            stored = await asyncio.to_thread(stored_image, self.store, relative)
            if stored is None:
                self.store.delete(relative)
                continue
            if stored.sha256 == recorded:
                continue
            await self.recorder.image(item, stored, old_file, provider)
            return True
        return False


class Slots:
    """A semaphore whose size can change: the items a worker has in flight at most."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self) -> None:
        while not self.try_acquire():
            self._freed.clear()
            await self._freed.wait()

    def try_acquire(self) -> bool:
        if self.used >= self.capacity:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1
        self._freed.set()

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self._freed.set()
