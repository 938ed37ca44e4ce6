"""How a run writes down what happened to an item, for both run modes: one recorder.

- `generated`: a paid URL, recorded at once (the committer makes it durable without anyone waiting).
- `image`: a verified image in place is recorded, the size it came in checked against what was asked
  (the model's catalog entry), and `done` is reported only once the commit that holds it is
  durable: images in place are fsynced first (in a thread), then the state commits. A provider that
  sends other sizes than asked (a relay that ignores the ratio) is reported once, with a count in
  the summary; with `on_size_mismatch: fail` such an image is not kept: the item fails with
  `size_mismatch` (a rerun tries it again), and after `MISMATCHES_TO_DISABLE` in a row from one
  provider, none matching, that provider is reported as misconfigured.
- `fail`: a failure with its reason and attempts.

The commit is a group commit: the first write wakes the committer, which makes every write since the
last commit durable at once, so a thousand images finishing together cost a few commits, not a
thousand.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pipeline.catalog import Model
from pipeline.download import StoredImage
from pipeline.errors import ItemError, RetryableError, StorageError
from pipeline.events import Event, EventKind
from pipeline.item import Item
from pipeline.state import DATABASE_ERRORS, State
from pipeline.storage import Store
from pipeline.summary import Summary

# The output or the state cannot be written: the run stops (exit 74), what was recorded stays resumable.
STORAGE_ERRORS: tuple[type[Exception], ...] = (StorageError, OSError, *DATABASE_ERRORS)
MISMATCHES_TO_DISABLE = 5  # images of another size in a row from one provider, none matching


class Recorder:
    def __init__(
        self,
        state: State,
        store: Store,
        summary: Summary,
        on_event: Callable[[Event], None],
        on_storage_error: Callable[[BaseException], None],
        model: Model | None = None,
        fail_mismatches: set[str] | None = None,
        on_misconfigured: Callable[[str, str], None] = lambda *_: None,
    ) -> None:
        self._state = state
        self._store = store
        self._summary = summary
        self._on_event = on_event
        self._on_storage_error = on_storage_error
        self._written = asyncio.Event()  # a write awaits the committer
        self._next_commit: asyncio.Future[None] | None = None  # what those waiting for durability await
        self._synced = False  # whether images were put in place since the last commit
        self._model = model  # the items' model in the catalog (None: sizes are not checked)
        self._fail_mismatches = fail_mismatches or set()  # providers whose other sizes are failures
        self._on_misconfigured = on_misconfigured  # (provider, why)
        self._matched: set[str] = set()  # providers an image of the asked size has come from

    def generated(self, item: Item, url: str | None, attempts: int, provider: str) -> None:
        """A paid reply whose image is still to be fetched: committed soon, without waiting for it."""
        self._state.record_generated(item, url, attempts, provider)
        self._written.set()

    async def image(
        self,
        item: Item,
        stored: StoredImage,
        old_file: str | None,
        provider: str | None,
        provenance: Mapping[str, str | None] | None = None,
    ) -> bool:
        """Record the image (False: not kept, its size was not the one asked); report it only once
        that record is durable."""
        mismatch = self._mismatch(item, stored, provider or "")
        if mismatch and (provider or "") in self._fail_mismatches:
            if stored.file != old_file:
                self._store.delete(stored.file)
            self.fail(item, RetryableError(mismatch, kind="size_mismatch"), 1, provider or "")
            return False
        row = metadata_row(item, stored, mismatch is not None, provider, provenance)
        self._state.record_done(item, row)
        await self.durable(images=True)
        if old_file and old_file != stored.file:
            self._store.delete(old_file)  # the image this one replaces
        self._summary.done += 1
        self._emit(EventKind.DONE, item, stored.file, provider or "")
        return True

    def _mismatch(self, item: Item, stored: StoredImage, provider: str) -> str | None:
        """What is wrong with the image's size, if anything; reported once per provider."""
        model = self._model
        matches = (
            model.size_matches(item.aspect_ratio, item.image_size, stored.width, stored.height)
            if model
            else None
        )
        if matches is not False or model is None:
            if matches:
                self._matched.add(provider)
            return None
        expected = model.expected(item.aspect_ratio, item.image_size)
        wanted = f"{item.aspect_ratio}{f' at {item.image_size}' if item.image_size else ''}"
        wanted += f" ({expected[0]}x{expected[1]})" if expected else ""
        text = f"got {stored.width}x{stored.height}, asked {wanted}"
        self._summary.size_mismatches[provider] += 1
        if self._summary.size_mismatches[provider] == 1:
            self._summary.warnings += 1
            said = (
                f"{text}: {provider or 'the provider'} may ignore the asked size (counted, not shown again)"
            )
            self._emit(EventKind.WARNING, item, said, provider)
        failing = provider in self._fail_mismatches and provider not in self._matched
        if failing and self._summary.size_mismatches[provider] == MISMATCHES_TO_DISABLE:  # all in a row
            why = f"{MISMATCHES_TO_DISABLE} images in a row of another size than asked ({text})"
            self._on_misconfigured(provider, why)
        return text

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


def metadata_row(
    item: Item,
    stored: StoredImage,
    mismatch: bool,
    provider: str | None,
    provenance: Mapping[str, str | None] | None = None,
) -> dict[str, Any]:
    """`provenance`: what the reply said of itself: `served_model` (the model it named, when it named
    one) and `service_tier` (the tier that served it)."""
    """The metadata.jsonl row of an image (kept in the state as is)."""
    return {
        "file_name": stored.file,
        "id": item.id,
        "index": item.index,
        "prompt": item.prompt,
        "aspect_ratio": item.aspect_ratio,
        "image_size": item.image_size,
        "model": item.model,
        "served_model": (provenance or {}).get("served_model"),
        "service_tier": (provenance or {}).get("service_tier"),
        "width": stored.width,
        "height": stored.height,
        "sha256": stored.sha256,
        "bytes": stored.bytes,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "aspect_ratio_mismatch": mismatch,
        "provider": provider,
    }
