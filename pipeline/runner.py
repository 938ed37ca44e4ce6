"""The run: plan each item, generate, download, record; never pay twice for an image.

Items stream from the manifest one at a time; a slot is taken before an item's task is created, so a
million-item manifest is never a million tasks. There are as many slots as downloads may be in
flight, and generation requests are further bounded by the provider pool (`pipeline.providers`:
each provider's controller, and the pool's total). A download never holds a generation slot and,
since its item already holds a slot, starts the moment its URL arrives (URLs expire: when downloads
are slow, it is generation that waits, never a paid URL). Each item's life is one coroutine; a
failure is recorded, never raised. The core never prints: it reports through `on_event` and the
returned `Summary`.

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
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter

from pipeline.classify import backoff_delay
from pipeline.dataset import write_dataset
from pipeline.download import EXTENSIONS, Downloader, StoredImage, stored_image
from pipeline.errors import (
    DownloadError,
    FatalError,
    ItemError,
    LeaseLost,
    NoImageError,
    StorageError,
    UrlGoneError,
)
from pipeline.healthcheck import ping
from pipeline.lock import OutputLock, claimed
from pipeline.manifest import Item, Manifest, ProviderSpec, iter_items
from pipeline.metrics import Histogram
from pipeline.plan import Step, step_of
from pipeline.presets import expected_size
from pipeline.providers import connect
from pipeline.providers.pool import Member, Pool
from pipeline.secret import Secret
from pipeline.state import DATABASE_ERRORS, Row, State, is_postgres, open_state, sqlite_path
from pipeline.storage import Store

STORAGE_ERRORS: tuple[type[Exception], ...] = (StorageError, OSError, *DATABASE_ERRORS)
CLAIM_EVERY = 32  # items looked at, and claimed, at a time
DOWNLOAD_TRIES = 3
THROTTLES_PER_ATTEMPT = 10  # 429s an item may meet per attempt it is allowed
YIELD_EVERY = 256  # planning items that need nothing gives the event loop a turn this often
MAX_PAUSE_S = 900.0  # a Retry-After longer than this is honoured as this


@dataclass(frozen=True)
class Endpoint:
    """A provider of the pool, resolved: where it is and its key (from the environment)."""

    spec: ProviderSpec
    base_url: str
    key: Secret


@dataclass(frozen=True)
class RunOptions:
    endpoints: list[Endpoint]
    retry_failed: bool = False
    max_requests: int | None = None
    max_duration_s: float | None = None
    grace_s: float = 30.0
    state_url: str | None = None  # postgresql://... or a SQLite file (default: state.db in the output)


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # done | failed | retry | warning | provider_disabled | provider_down | batch_...
    item: str  # "" for provider events
    message: str = ""
    provider: str = ""


@dataclass
class Summary:
    total: int = 0
    done: int = 0  # finished by this run
    skipped: int = 0  # already done before this run
    failed: Counter[str] = field(default_factory=Counter)  # items failed now, by reason
    requests: int = 0  # generation requests sent (each may be billed)
    retries: Counter[str] = field(default_factory=Counter)  # by error kind
    downloads: int = 0
    warnings: int = 0
    elapsed_s: float = 0.0
    handed_over: int = 0  # items another worker took over (this one's lease ran out)
    stopped: str | None = None  # why the run stopped taking new items early
    fatal: str | None = None
    storage: str | None = None  # the output could not be written
    signal: int | None = None
    download_wait: Histogram = field(default_factory=Histogram)  # URL received -> download started
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)  # figures by provider

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.skipped - sum(self.failed.values()) - self.handed_over

    @property
    def exit_code(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        if self.storage:
            return 74
        if self.fatal:
            return 3
        return 1 if self.failed else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "done": self.done, "skipped": self.skipped,
            "failed": dict(self.failed), "remaining": self.remaining, "requests": self.requests,
            "retries": dict(self.retries), "downloads": self.downloads, "warnings": self.warnings,
            "handed_over": self.handed_over,
            "elapsed_s": round(self.elapsed_s, 3), "stopped": self.stopped, "fatal": self.fatal,
            "storage": self.storage, "providers": self.providers,
            "download_wait_ms": {
                "p50": self.download_wait.percentile(0.5), "p99": self.download_wait.percentile(0.99),
            },
            "exit_code": self.exit_code,
        }  # fmt: skip


class Runner:
    def __init__(
        self,
        manifest: Manifest,
        store: Store,
        options: RunOptions,
        on_event: Callable[[Event], None] = lambda event: None,
    ) -> None:
        self.manifest = manifest
        self.store = store
        self.options = options
        self.summary = Summary(total=manifest.total_items)
        self._on_event = on_event
        self._rng = random.Random()
        rpm = manifest.requests_per_minute if manifest.providers else None  # else the default provider's
        self._rpm = rpm
        self._workers = 1  # live workers sharing the limits (a shared state)
        self._rate = AsyncLimiter(1, 60.0 / rpm) if rpm else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._next_commit: asyncio.Future[None] | None = None
        self._written = asyncio.Event()  # state writes await the committer

    async def run(self) -> Summary:
        with recorded_run(self.store, self.options.state_url, self.manifest.lease_s, self.summary) as state:
            self._state = state
            try:
                await self._run_all()
            except* STORAGE_ERRORS as group:
                self._storage_failed(group.exceptions[0])
        return self.summary

    def _storage_failed(self, exc: BaseException) -> None:
        if not self.summary.storage:
            self.summary.storage = str(exc)
        self.stop("storage")

    def stop(self, reason: str) -> None:
        """Take no new items; in-flight ones get `grace_s` to finish. The first reason is kept."""
        if not self._stopping.is_set():
            self.summary.stopped = reason
            self._stopping.set()

    def interrupt(self, signum: int) -> None:
        """A signal: the first stops as `stop` does, a second cancels in-flight work at once."""
        if self.summary.signal is not None:
            self._cancel_all()
        self.summary.signal = signum
        self.stop("interrupted")

    def _cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _run_all(self) -> None:
        limit = self.manifest.items_in_flight
        self._slots = Slots(limit)
        connector = aiohttp.TCPConnector(limit=limit + 4)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            self._pool = self._build_pool(session)
            self._downloader = Downloader(
                session, self.store, max_bytes=int(self.manifest.download_max_mb * 1_000_000),
                timeout_s=max(e.spec.timeout_s for e in self.options.endpoints),
            )  # fmt: skip
            healthcheck = self.manifest.healthcheck_url
            await ping(session, healthcheck, "/start")
            helpers = [asyncio.create_task(self._watchdog()), asyncio.create_task(self._committer())]
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
                self._commit()
                await ping(session, healthcheck, "" if self.summary.exit_code == 0 else "/fail")

    def _build_pool(self, session: aiohttp.ClientSession) -> Pool:
        manifest = self.manifest
        members = [
            Member(
                e.spec, connect(e.spec, session, e.base_url, e.key),
                e.spec.price_per_image if e.spec.price_per_image is not None else manifest.price_per_image,
                manifest.backoff_cap_s,
            )
            for e in self.options.endpoints
        ]  # fmt: skip
        return Pool(members, manifest.generation_limit, self._provider_event)

    def _provider_event(self, kind: str, provider: str, message: str) -> None:
        self.summary.warnings += 1
        self._on_event(Event(kind, "", message, provider))

    async def _feed(self, slots: Slots) -> None:
        """Every item in manifest order, a chunk at a time; then, with a shared state, the items other
        workers held when this one looked, until each is settled (by them, or taken over)."""
        async with asyncio.TaskGroup() as group:
            held: list[Item] = []
            chunk = CLAIM_EVERY if self._state.shared else YIELD_EVERY
            items = iter(iter_items(self.manifest))
            while (batch := list(itertools.islice(items, chunk))) and not self._stopping.is_set():
                await asyncio.sleep(0)  # skipping done items must not starve signals and work
                held += await self._take(batch, slots, group)
            while held and not self._stopping.is_set():
                await self._pause(self._state.heartbeat_s)
                held = await self._take(held, slots, group)

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

    async def _committer(self) -> None:
        """Group commit: wake on the first write, commit everything written meanwhile at once."""
        while True:
            await self._written.wait()
            self._written.clear()
            if self._next_commit is not None:  # images were put in place: make that durable first
                try:
                    await asyncio.to_thread(self.store.sync)
                except OSError as exc:
                    self._storage_failed(exc)
            self._commit()

    def _commit(self) -> None:
        """One commit for every write since the last; wakes the items waiting to report done."""
        waiting, self._next_commit = self._next_commit, None
        try:
            self._state.commit()
        except DATABASE_ERRORS as exc:
            self._storage_failed(exc)
            if waiting:
                waiting.set_exception(exc)
            return
        if waiting:
            waiting.set_result(None)

    async def _durable(self) -> None:
        """Wait for the commit that makes every write so far durable."""
        if self._next_commit is None:
            self._next_commit = asyncio.get_running_loop().create_future()
        self._written.set()
        await asyncio.shield(self._next_commit)

    async def _watchdog(self) -> None:
        """Stops the run at --max-duration; cancels what is left when the grace period ends."""
        limit = self.options.max_duration_s
        if limit is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), limit)
            self.stop("max_duration")
        await self._stopping.wait()
        await asyncio.sleep(self.options.grace_s)
        self._cancel_all()

    async def _process(self, item: Item, step: Step, row: Row | None) -> None:
        try:
            await self._work(item, step, row)
        except LeaseLost as exc:
            self.summary.handed_over += 1
            self._emit("warning", item, str(exc))
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)

    async def _work(self, item: Item, step: Step, row: Row | None) -> None:
        old_file = row.file if row else None
        provider = row.provider if row else None  # who generated a recorded URL
        if step in (Step.DOWNLOAD, Step.ADOPT) and await self._adopt(item, old_file, provider):
            return
        ref = row.url if step is Step.DOWNLOAD and row else None
        received_at = time.monotonic()
        attempts = throttles = 0
        while True:
            if ref is None:
                try:
                    generated = await self._generate(item)
                except ItemError as exc:
                    # A 429 is not billed and its provider paces the next try: it costs no attempt,
                    # up to a bound that still ends an item on a provider that never lets it through.
                    throttled = (
                        exc.kind == "rate_limited"
                        and throttles < THROTTLES_PER_ATTEMPT * self.manifest.max_attempts
                    )
                    throttles += throttled
                    attempts += not throttled
                    delay = self._after_failure(item, exc, attempts)
                    if delay is None:
                        return
                    await self._pause(delay)
                    continue
                if generated is None:
                    return  # the run is stopping; the item stays resumable
                ref, provider = generated
                attempts += 1
                received_at = time.monotonic()
                url = ref if not ref.startswith("data:") else None
                self._state.record_generated(item, url, attempts, provider)
                self._written.set()  # a paid URL: commit it now, without waiting for it
            try:
                stored = await self._download(item, ref, received_at, old_file)
            except ItemError as exc:
                ref = None
                if isinstance(exc, UrlGoneError | DownloadError) and attempts < self.manifest.max_attempts:
                    self.summary.retries[exc.kind] += 1
                    self._emit("retry", item, exc.message)
                    continue
                self._fail(item, exc, attempts)
                return
            await self._finish(item, stored, old_file, provider)
            return

    async def _pause(self, seconds: float) -> None:
        """Sleep before a retry; a stop ends the pause at once (the item then stays resumable)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), min(seconds, MAX_PAUSE_S))

    def _may_send(self) -> bool:
        """Asked right before each paid request: counts it, unless the run may send no more."""
        budget = self.options.max_requests
        if budget is not None and self.summary.requests >= budget:
            self.stop("max_requests")
        if self._stopping.is_set():
            return False
        self.summary.requests += 1
        return True

    async def _generate(self, item: Item) -> tuple[str, str] | None:
        """One paid request: the first image reference and the provider that made it, or None when the
        run may send no more."""
        if self._rate:
            await self._rate.acquire()
        generated = await self._pool.generate(item, self._may_send)
        if generated is None:
            return None
        result, provider = generated
        return result.refs[0], provider

    def _after_failure(self, item: Item, exc: ItemError, attempts: int) -> float | None:
        """Seconds to wait before trying again, or None when the item is settled (or the run over)."""
        if isinstance(exc, FatalError):
            self.summary.fatal = exc.message
            self.stop("fatal")
            return None
        retry_no_image = isinstance(exc, NoImageError) and attempts < 2
        if (exc.retryable or retry_no_image) and attempts < self.manifest.max_attempts:
            self.summary.retries[exc.kind] += 1
            self._emit("retry", item, exc.message)
            if exc.kind == "rate_limited":
                return 0.0  # the provider's controller paces it (or another provider takes it)
            return exc.retry_after if exc.retry_after is not None else self._backoff(attempts)
        self._fail(item, exc, attempts)
        return None

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._rng, self.manifest.backoff_base_s, self.manifest.backoff_cap_s)

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
            await self._finish(item, stored, old_file, provider)
            return True
        return False

    async def _finish(
        self, item: Item, stored: StoredImage, old_file: str | None, provider: str | None
    ) -> None:
        """Record the image; report it only once that record is durable."""
        expected = expected_size(item.model, item.aspect_ratio, item.image_size)
        mismatch = expected is not None and expected != (stored.width, stored.height)
        self._state.record_done(item, metadata_row(item, stored, mismatch, provider))
        await self._durable()
        if old_file and old_file != stored.file:
            self.store.delete(old_file)  # the image this one replaces
        self.summary.done += 1
        if mismatch and expected:
            self.summary.warnings += 1
            wanted = f"{item.aspect_ratio}{f' at {item.image_size}' if item.image_size else ''}"
            wanted += f" ({expected[0]}x{expected[1]})"
            self._emit("warning", item, f"got {stored.width}x{stored.height}, asked {wanted}")
        self._emit("done", item, stored.file, provider or "")

    def _fail(self, item: Item, exc: ItemError, attempts: int) -> None:
        self._state.record_failed(item, exc.kind, exc.message, attempts)
        self.summary.failed[exc.kind] += 1
        self._emit("failed", item, f"{exc.kind}: {exc.message}")

    def _emit(self, kind: str, item: Item, message: str = "", provider: str = "") -> None:
        self._on_event(Event(kind, item.name, message, provider))


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


@contextmanager
def recorded_run(store: Store, state_url: str | None, lease_s: float, summary: Summary) -> Iterator[State]:
    """The output claimed for one run (a shared state needs no lock) and its state store open; the run
    recorded at its start, and at its end with its summary, once the dataset files are rewritten from
    the state. A storage failure anywhere ends up in `summary.storage` (exit 74)."""
    started = time.monotonic()
    with _locked(store, state_url):
        store.prepare()
        state = open_state(state_url, output_identity(store), store.local, lease_s=lease_s)
        try:
            state.begin()
            run_id = state.start_run()
            state.commit()
            yield state
            summary.elapsed_s = time.monotonic() - started
            state.retire()
            write_dataset(state, store)
            state.end_run(run_id, summary.exit_code, summary.as_dict())
        except STORAGE_ERRORS as exc:
            summary.storage = summary.storage or str(exc)
        finally:
            state.close()
            store.close()


def _locked(store: Store, state_url: str | None) -> AbstractContextManager[Any]:
    """One worker at a time on an output whose state is a SQLite file (its folder's lock)."""
    if is_postgres(state_url):
        return nullcontext()
    if store.local is not None and state_url is None:
        return claimed(store.local)
    return OutputLock(sqlite_path(state_url, store.url, store.local).parent)


def output_identity(store: Store) -> str:
    """The output as a shared state records it: the same for every worker (an absolute path)."""
    return str(store.local.resolve()) if store.local is not None else store.url


def metadata_row(item: Item, stored: StoredImage, mismatch: bool, provider: str | None) -> dict[str, Any]:
    """The metadata.jsonl row of an image (kept in the state as is)."""
    return {
        "file_name": stored.file, "id": item.id, "index": item.index, "prompt": item.prompt,
        "aspect_ratio": item.aspect_ratio, "image_size": item.image_size, "model": item.model,
        "width": stored.width,
        "height": stored.height, "sha256": stored.sha256, "bytes": stored.bytes,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "aspect_ratio_mismatch": mismatch, "provider": provider,
    }  # fmt: skip
