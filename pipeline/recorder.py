"""How a run writes down what happened to an item, for both run modes: one recorder.

- `generated`: a paid URL, recorded at once (the committer makes it durable without anyone waiting).
- `image`: a verified image in place is recorded, the size it came in checked against what was asked,
  and `done` is reported only once the commit that holds it is durable: images in place are fsynced
  first (in a thread), then the state commits.
- `fail`: a failure with its reason and attempts.

The commit is a group commit: the first write wakes the committer, which makes every write since the
last commit durable at once, so a thousand images finishing together cost a few commits, not a
thousand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pipeline.download import StoredImage
from pipeline.errors import ItemError, StorageError
from pipeline.events import Event, EventKind
from pipeline.item import Item
from pipeline.presets import expected_size
from pipeline.state import DATABASE_ERRORS, State
from pipeline.storage import Store
from pipeline.summary import Summary

# The output or the state cannot be written: the run stops (exit 74), what was recorded stays resumable.
STORAGE_ERRORS: tuple[type[Exception], ...] = (StorageError, OSError, *DATABASE_ERRORS)


class Recorder:
    def __init__(
        self,
        state: State,
        store: Store,
        summary: Summary,
        on_event: Callable[[Event], None],
        on_storage_error: Callable[[BaseException], None],
    ) -> None:
        self._state = state
        self._store = store
        self._summary = summary
        self._on_event = on_event
        self._on_storage_error = on_storage_error
        self._written = asyncio.Event()  # a write awaits the committer
        self._next_commit: asyncio.Future[None] | None = None  # what those waiting for durability await
        self._synced = False  # whether images were put in place since the last commit

    def generated(self, item: Item, url: str | None, attempts: int, provider: str) -> None:
        """A paid reply whose image is still to be fetched: committed soon, without waiting for it."""
        self._state.record_generated(item, url, attempts, provider)
        self._written.set()

    async def image(
        self, item: Item, stored: StoredImage, old_file: str | None, provider: str | None
    ) -> None:
        """Record the image; report it only once that record is durable."""
        expected = expected_size(item.model, item.aspect_ratio, item.image_size)
        mismatch = expected is not None and expected != (stored.width, stored.height)
        self._state.record_done(item, metadata_row(item, stored, mismatch, provider))
        await self.durable(images=True)
        if old_file and old_file != stored.file:
            self._store.delete(old_file)  # the image this one replaces
        self._summary.done += 1
        if mismatch and expected:
            self._summary.warnings += 1
            wanted = f"{item.aspect_ratio}{f' at {item.image_size}' if item.image_size else ''}"
            wanted += f" ({expected[0]}x{expected[1]})"
            self._emit(EventKind.WARNING, item, f"got {stored.width}x{stored.height}, asked {wanted}")
        self._emit(EventKind.DONE, item, stored.file, provider or "")

    def fail(self, item: Item, error: ItemError, attempts: int, provider: str = "") -> None:
        self._state.record_failed(item, error.kind, error.message, attempts)
        self._summary.failed[error.kind] += 1
        self._emit(EventKind.FAILED, item, f"{error.kind}: {error.message}", provider)
        self._written.set()

    async def durable(self, images: bool = False) -> None:
        """Wait for the commit that makes every write so far durable (`images`: files were put in place,
        to be synced before the state records them)."""
        self._synced |= images
        if self._next_commit is None:
            self._next_commit = asyncio.get_running_loop().create_future()
        self._written.set()
        await asyncio.shield(self._next_commit)

    async def committer(self) -> None:
        """Group commit, until cancelled: wake on the first write, commit everything written meanwhile."""
        while True:
            await self._written.wait()
            self._written.clear()
            await self.commit()

    async def commit(self) -> None:
        """One commit for every write since the last; wakes those waiting for it."""
        waiting, self._next_commit = self._next_commit, None
        try:
            if self._synced:
                self._synced = False
                await asyncio.to_thread(self._store.sync)
            self._state.commit()
        except STORAGE_ERRORS as exc:
            self._on_storage_error(exc)
            if waiting:
                waiting.set_exception(exc)
                waiting.exception()  # retrieved: an item that was cancelled meanwhile awaits it no more
            return
        if waiting:
            waiting.set_result(None)

    def _emit(self, kind: EventKind, item: Item, message: str = "", provider: str = "") -> None:
        self._on_event(Event(kind, item.name, message, provider))


def metadata_row(item: Item, stored: StoredImage, mismatch: bool, provider: str | None) -> dict[str, Any]:
    """The metadata.jsonl row of an image (kept in the state as is)."""
    return {
        "file_name": stored.file,
        "id": item.id,
        "index": item.index,
        "prompt": item.prompt,
        "aspect_ratio": item.aspect_ratio,
        "image_size": item.image_size,
        "model": item.model,
        "width": stored.width,
        "height": stored.height,
        "sha256": stored.sha256,
        "bytes": stored.bytes,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "aspect_ratio_mismatch": mismatch,
        "provider": provider,
    }
