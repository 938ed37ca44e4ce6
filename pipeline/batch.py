"""Batch runs: Google's Batch Mode at half price, from the manifest to a verified dataset, resumable.

Beside the online runner, not inside it: batch mode changes when results arrive (submit, poll,
collect), not how a reply is read (the gemini classification) or how an image lands (the same
verified write path, state and metadata).

Never pay twice, never lose a job:
- A job is recorded with a deterministic display name and the items it holds before anything is
  sent. A job still `creating` (the run died, or the create's reply was lost) is looked for by that
  name on every page of the provider's list and adopted; it is created only when it is not there.
- An item held by a job not yet collected or ended goes into no other job. A job that ends FAILED,
  CANCELLED or EXPIRED gives its items back; a SUCCEEDED one is collected once: its results file is
  streamed to disk, then read line by line (each line, an image of 1-2 MB in base64, is decoded,
  written, recorded and dropped in turn), and a line whose image is already recorded is skipped.
- Retryable lines (429, 5xx) go into the next job, within `max_attempts`; refusals and permanent
  errors are recorded as online ones are. After collection the job's files are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiofiles
import aiohttp

from pipeline.classify import backoff_delay
from pipeline.download import Downloader
from pipeline.errors import ItemError, StorageError
from pipeline.manifest import Item, Manifest, iter_items
from pipeline.plan import Step, plan_items
from pipeline.presets import expected_size
from pipeline.providers.gemini import GeminiClient, request_body, results_line
from pipeline.providers.gemini_batch import BatchClient
from pipeline.runner import Event, RunOptions, Summary, metadata_row, output_identity, recorded_run
from pipeline.state import OPEN_STAGES
from pipeline.storage import Store

SUCCEEDED = "BATCH_STATE_SUCCEEDED"
ENDED = ("BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")
MAX_POLL_S = 300.0  # polls back off to this
COMMIT_EVERY = 32  # results lines written between two state commits
STEP_TRIES = 3  # submitting or polling, tried this often through transient failures before the run stops


class BatchRunner:
    def __init__(
        self,
        manifest: Manifest,
        store: Store,
        options: RunOptions,
        on_event: Callable[[Event], None] = lambda event: None,
        submit_only: bool = False,
    ) -> None:
        self.manifest = manifest
        self.store = store
        self.options = options
        self.summary = Summary(total=manifest.total_items)
        self._endpoint = options.endpoints[0]
        self._on_event = on_event
        self._submit_only = submit_only
        self._stopping = asyncio.Event()
        self._tag = hashlib.sha256(output_identity(store).encode()).hexdigest()[:8]
        self._submissions: Counter[str] = Counter()  # jobs each item went into during this run
        self._jobs = {"created": 0, "adopted": 0, "collected": 0, "ended": 0}
        self._rng = random.Random()

    def stop(self, reason: str) -> None:
        if not self._stopping.is_set():
            self.summary.stopped = reason
            self._stopping.set()

    def interrupt(self, signum: int) -> None:
        """A signal: stop waiting at once; every job is recorded already."""
        self.summary.signal = signum
        self.stop("interrupted")

    async def run(self) -> Summary:
        with recorded_run(self.store, self.options.state_url, self.manifest.lease_s, self.summary) as state:
            self._state = state
            try:
                await self._session()
            except ItemError as exc:  # the batch API itself failed: every job stays recorded
                self.summary.fatal = f"{self._endpoint.spec.name}: {exc.message}"
            except OSError as exc:  # writing a job's input or reading its results: the disk
                self.summary.storage = str(exc.strerror or exc)
            self.summary.providers = {self._endpoint.spec.name: {"batch_jobs": dict(self._jobs)}}
        return self.summary

    async def _session(self) -> None:
        endpoint = self._endpoint
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            self._api = BatchClient(session, endpoint.base_url, endpoint.key, endpoint.spec.timeout_s)
            self._references = GeminiClient(session, endpoint.base_url, endpoint.key, endpoint.spec)
            self._writer = Downloader(
                session, self.store, max_bytes=int(self.manifest.download_max_mb * 1_000_000),
                timeout_s=endpoint.spec.timeout_s,
            )  # fmt: skip
            try:
                await self._work()
            finally:
                self._writer.close()

    async def _work(self) -> None:
        settings = self.manifest.batch
        await self._retrying(self._poll_all)
        await self._retrying(self._submit, True)
        if self._submit_only:
            self.stop("submitted")
            return
        deadline = time.monotonic() + settings.max_wait_s
        interval = settings.poll_interval_s
        while self._state.batches(OPEN_STAGES) and not self._stopping.is_set():
            if time.monotonic() >= deadline:
                self.stop("max_wait")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(interval, deadline - time.monotonic()))
            if self._stopping.is_set():
                return
            interval = min(interval * 1.5, max(MAX_POLL_S, settings.poll_interval_s))
            try:
                if await self._poll_all():
                    await self._submit()  # items given back (retryable lines, ended jobs): a new job
            except ItemError as exc:
                if not exc.retryable:
                    raise
                self.summary.retries[exc.kind] += 1  # the provider hiccuped: the next poll tries again
                self._event("batch_warning", f"{exc.message}; polling again")

    async def _retrying(self, step: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """A step of the run, tried again after a transient failure (with backoff) before giving up:
        then the run stops (exit 3) with every job recorded, for the next run to resume."""
        for attempt in range(1, STEP_TRIES + 1):
            try:
                await step(*args)
                return
            except ItemError as exc:
                if not exc.retryable or attempt == STEP_TRIES:
                    raise
                self.summary.retries[exc.kind] += 1
                await asyncio.sleep(backoff_delay(attempt, self._rng, self.manifest.backoff_base_s,
                                                  self.manifest.backoff_cap_s))  # fmt: skip

    # Submitting

    async def _submit(self, first: bool = False) -> None:
        """Every item that needs a generation and is in no open job, into jobs of `max_requests`.
        The first pass of a run also counts what was done or failed for good before it."""
        chunk: list[Item] = []
        budget = self.options.max_requests
        for item, row, step in plan_items(self.manifest, self._state, self.store, self.options.retry_failed):
            if self._stopping.is_set():
                return
            if step is Step.DONE:
                self.summary.skipped += first
                continue
            if step is Step.FAILED:
                if first and row:
                    self.summary.failed[row.error_type or "error"] += 1
                continue
            if self._state.in_open_batch(item):
                continue
            if step is Step.DOWNLOAD and row and row.url and await self._fetch_recorded(item, row.url):
                continue
            if self._submissions[item.name] >= self.manifest.max_attempts:
                continue
            if budget is not None and self.summary.requests + len(chunk) >= budget:
                self.stop("max_requests")
                break
            chunk.append(item)
            if len(chunk) == self.manifest.batch.max_requests:
                await self._new_job(chunk)
                chunk = []
        if chunk:
            await self._new_job(chunk)

    async def _fetch_recorded(self, item: Item, url: str) -> bool:
        """An online run's paid URL, still fresh: download it rather than pay for a batch line."""
        try:
            stored = await self._writer.fetch(url, item.name)
        except ItemError:
            return False
        self._record_image(item, stored, None)
        self._commit()
        return True

    async def _new_job(self, items: list[Item]) -> None:
        display_name = f"imggen-{self._tag}-{self._state.batch_count() + 1:04d}"
        self._state.add_batch(display_name, self._endpoint.spec.name, items)
        self._commit()  # recorded, with its items, before anything is sent
        for item in items:
            self._submissions[item.name] += 1
        self.summary.requests += len(items)
        path = self.store.spool / f"{display_name}.jsonl"
        async with aiofiles.open(path, "w") as out:
            for item in items:
                inline = [await self._references.inline_reference(ref) for ref in item.images]
                await out.write(json.dumps({"key": item.name, "request": request_body(item, inline)}) + "\n")
        input_file = await self._api.upload(path, display_name)
        path.unlink()
        self._state.update_batch(display_name, input_file=input_file)
        self._commit()
        await self._create(display_name, input_file)

    async def _create(self, display_name: str, input_file: str) -> None:
        model = self._endpoint.spec.model or self.manifest.item_model
        try:
            operation = await self._api.create(model, display_name, input_file)
        except ItemError as exc:
            if not exc.retryable:
                raise
            found = await self._api.find(display_name)  # the reply may be lost, not the job
            if found is None:
                return  # still `creating`: the next poll (or run) looks again, then creates
            operation = found
            self._jobs["adopted"] += 1
        else:
            self._jobs["created"] += 1
        self._activate(display_name, operation)

    def _activate(self, display_name: str, operation: dict[str, Any]) -> None:
        remote = (operation.get("metadata") or {}).get("state")
        self._state.update_batch(display_name, name=operation["name"], stage="active", remote_state=remote)
        self._commit()
        self._event("batch_submitted", f"{display_name} ({operation['name']})")

    # Polling and collecting

    async def _poll_all(self) -> bool:
        """Look at every open job once; collect the finished. True when items were given back."""
        given_back = False
        for job in self._state.batches(OPEN_STAGES):
            if self._stopping.is_set():
                break
            if job.stage == "creating":
                await self._resume_create(job.display_name, job.input_file)
                continue
            assert job.name is not None
            operation = await self._api.get(job.name)
            metadata = operation.get("metadata") or {}
            remote = str(metadata.get("state"))
            self._state.update_batch(job.display_name, remote_state=remote)
            if remote == SUCCEEDED:
                output = metadata.get("output") or operation.get("response") or {}
                if output.get("responsesFile"):  # SUCCEEDED can come before the file's name
                    given_back |= await self._collect(
                        job.display_name, job.input_file, output["responsesFile"]
                    )
            elif remote in ENDED:
                self._state.update_batch(job.display_name, stage="ended")
                self._jobs["ended"] += 1
                self._event("batch_ended", f"{job.display_name}: {remote}; its {job.items} items go back")
                await self._delete(job.input_file)
                given_back = True
            self._commit()
        return given_back

    async def _resume_create(self, display_name: str, input_file: str | None) -> None:
        found = await self._api.find(display_name)
        if found is not None:
            self._jobs["adopted"] += 1
            self._activate(display_name, found)
            return
        if input_file is None:  # died before the upload finished: the job is made again, same items
            self._state.update_batch(display_name, stage="ended", remote_state="NEVER_CREATED")
            self._commit()
            return
        await self._create(display_name, input_file)

    async def _collect(self, display_name: str, input_file: str | None, results_file: str) -> bool:
        members = self._state.batch_members(display_name)
        items = {
            item.name: item
            for item in iter_items(self.manifest)
            if item.name in members and members[item.name][2] == item.fingerprint
        }
        path = self.store.spool / f"{display_name}.results.jsonl"
        await self._api.download(results_file, path)
        done = failed = given_back = 0
        with path.open("rb") as lines:  # no line-length cap: a line holds a whole image
            for n, raw in enumerate(lines, 1):
                outcome = await self._line(raw, items)
                done += outcome == "done"
                failed += outcome == "failed"
                given_back += outcome == "retry"
                if n % COMMIT_EVERY == 0:
                    self._commit()
        path.unlink()
        self._state.update_batch(display_name, stage="collected", results_file=results_file, done=done,
                                 failed=failed)  # fmt: skip
        self._commit()
        self._jobs["collected"] += 1
        self._event(
            "batch_collected", f"{display_name}: {done} images, {failed} failed, {given_back} to retry"
        )
        await self._delete(input_file)
        await self._delete(results_file)
        return given_back > 0 or done + failed < len(members)  # a key with no line goes into a later job

    async def _line(self, raw: bytes, items: dict[str, Item]) -> str:
        """One results line, written and recorded: done, failed, retry, or skipped."""
        try:
            line = json.loads(raw)
        except ValueError:
            return "skipped"  # blank or cut short: its item, with no line, goes into a later job
        if not isinstance(line, dict):
            return "skipped"
        item = items.get(str(line.get("key")))
        if item is None:
            return "skipped"  # not ours, or the manifest changed the item since
        row = self._state.get(item)
        if row is not None and row.status == "done" and row.image_fp == item.fingerprint:
            return "skipped"  # recorded when these results were read before a crash
        outcome = results_line(line)
        del line
        attempts = row.attempts if row and row.fp == item.fingerprint else 0
        if isinstance(outcome, ItemError):
            return self._failed(item, outcome, attempts)
        try:
            stored = await self._writer.fetch(outcome[0], item.name)
        except ItemError as exc:  # bytes that do not decode, too large: as online, recorded
            return self._failed(item, exc, attempts)
        self._record_image(item, stored, row.file if row else None)
        return "done"

    def _failed(self, item: Item, exc: ItemError, attempts: int) -> str:
        attempts += 1
        self._state.record_failed(item, exc.kind, exc.message, attempts)
        if exc.retryable and self._submissions[item.name] < self.manifest.max_attempts:
            self.summary.retries[exc.kind] += 1
            return "retry"
        self.summary.failed[exc.kind] += 1
        self._submissions[item.name] = self.manifest.max_attempts  # settled for this run
        self._on_event(Event("failed", item.name, f"{exc.kind}: {exc.message}", self._endpoint.spec.name))
        return "failed"

    def _record_image(self, item: Item, stored: Any, old_file: str | None) -> None:
        expected = expected_size(item.model, item.aspect_ratio, item.image_size)
        mismatch = expected is not None and expected != (stored.width, stored.height)
        self._state.record_done(item, metadata_row(item, stored, mismatch, self._endpoint.spec.name))
        if old_file and old_file != stored.file:
            self.store.delete(old_file)
        self.summary.done += 1
        self.summary.downloads += 1
        self.summary.warnings += mismatch
        self._on_event(Event("done", item.name, stored.file, self._endpoint.spec.name))

    async def _delete(self, name: str | None) -> None:
        """Files API storage is limited (and kept 48 h): delete what was collected, quietly."""
        if name:
            with contextlib.suppress(ItemError):
                await self._api.delete_file(name)

    def _commit(self) -> None:
        """Images renamed into place are made durable, then the state that records them."""
        try:
            self.store.sync()
        except OSError as exc:
            raise StorageError(f"cannot sync images/: {exc.strerror or exc}") from exc
        self._state.commit()

    def _event(self, kind: str, message: str) -> None:
        self._on_event(Event(kind, "", message, self._endpoint.spec.name))
