"""The run core both modes share: online (`pipeline.runner`) and batch (`pipeline.batch`).

`RunCore.run()` claims the output for the run, opens its state, records the run's start, starts the
group committer of its `Recorder`, lets the mode do its work, then makes everything durable,
rewrites the dataset files from the state and records the run's end with its summary. A storage
failure anywhere ends up in `summary.storage` (exit 74). Stopping (a budget, a signal, no provider
left) is the same in both: no new work is started, and every unfinished item stays resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from pipeline.classify import backoff_delay
from pipeline.dataset import write_dataset
from pipeline.errors import ItemError, NoProviderLeft
from pipeline.events import Event, EventKind
from pipeline.item import Item
from pipeline.locations import is_postgres
from pipeline.lock import OutputLock, claimed
from pipeline.manifest import Manifest, ProviderSpec
from pipeline.recorder import STORAGE_ERRORS, Recorder
from pipeline.retry import Action, Decision
from pipeline.secret import Secret
from pipeline.state import State, open_state, sqlite_path
from pipeline.storage import Store
from pipeline.summary import Summary

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
    submit_only: bool = False  # batch: submit the jobs and end


class RunCore:
    """One run of a manifest into an output; a mode implements `_work`."""

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
        self._stopping = asyncio.Event()

    async def run(self) -> Summary:
        with recorded_run(self.store, self.options.state_url, self.manifest.lease_s, self.summary) as state:
            self._state = state
            manifest = self.manifest
            failing = {
                spec.name
                for spec in manifest.pool()
                if (spec.on_size_mismatch or manifest.on_size_mismatch) == "fail"
            }
            self.recorder = Recorder(
                state,
                self.store,
                self.summary,
                self._on_event,
                self._storage_failed,
                manifest.model_entry,
                failing,
                self._misconfigured,
            )
            committer = asyncio.create_task(self.recorder.committer())
            try:
                await self._work()
            except* STORAGE_ERRORS as group:
                self._storage_failed(group.exceptions[0])
            finally:
                committer.cancel()
                await self.recorder.commit()
        return self.summary

    async def _work(self) -> None:
        raise NotImplementedError

    def stop(self, reason: str) -> None:
        """Start nothing new; what is in flight may finish. The first reason is kept."""
        if not self._stopping.is_set():
            self.summary.stopped = reason
            self._stopping.set()

    def interrupt(self, signum: int) -> None:
        """A signal: stop as `stop` does."""
        self.summary.signal = signum
        self.stop("interrupted")

    def _storage_failed(self, exc: BaseException) -> None:
        if not self.summary.storage:
            self.summary.storage = str(exc)
        self.stop("storage")

    def _misconfigured(self, provider: str, why: str) -> None:
        """The recorder found a provider misconfigured (its images are not the size asked)."""

    def _no_provider(self, exc: NoProviderLeft | ItemError) -> None:
        """No provider can go on: stop, every unfinished item as it was (exit 75 or 3)."""
        if isinstance(exc, NoProviderLeft) and exc.temporary:
            self.summary.outage = self.summary.outage or str(exc)
            self.stop("outage")
        else:
            self.summary.fatal = self.summary.fatal or str(exc)
            self.stop("fatal")

    async def _follow(self, item: Item, error: ItemError, decision: Decision, attempts: int) -> bool:
        """Carry out a retry decision: True when the item is to be tried again (after its pause)."""
        if decision.action is Action.STOP:
            self._no_provider(error)
            return False
        if decision.action is Action.GIVE_UP:
            self.recorder.fail(item, error, attempts)
            return False
        self.summary.retries[error.kind] += 1
        self._emit(EventKind.RETRY, item, error.message)
        await self._pause(decision.delay_s if decision.delay_s is not None else self._backoff(attempts))
        return True

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self._rng, self.manifest.backoff_base_s, self.manifest.backoff_cap_s)

    async def _pause(self, seconds: float) -> None:
        """Sleep; a stop ends the pause at once."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(seconds, MAX_PAUSE_S)):
                await self._stopping.wait()

    def _emit(self, kind: EventKind, item: Item | None, message: str = "", provider: str = "") -> None:
        self._on_event(Event(kind, item.name if item else "", message, provider))


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
