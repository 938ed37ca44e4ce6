"""Batch runs at half price (Google's Batch Mode, OpenAI's Batch API), from the manifest to a
verified dataset, resumable: one runner, whatever the provider.

Beside the online runner, not inside it: batch mode changes when results arrive (submit, poll,
collect), not how a reply is read (each protocol's classification) or how an image lands (the same
verified write path, state and metadata). Each provider's batch API is a wire module beneath it
(`pipeline.providers.BatchApi`: `gemini_batch`, `openai_batch`), as the online protocols are beneath
the pool.

Never pay twice, never lose a job:
- A job is recorded with a deterministic display name and the items it holds before anything is
  sent. A job still `creating` (the run died, or the create's reply was lost) is looked for by that
  name on every page of the provider's list and adopted; it is created only when it is not there.
- An item held by a job not yet collected or ended goes into no other job. A job that ends failed,
  cancelled (or expired, on Google) gives its items back; a succeeded one is collected once (on
  OpenAI an expired one too, for what it made): its results files (OpenAI: output and errors) are
  streamed to disk, then their lines are decoded, verified and spooled several at a time in worker
  processes (`pipeline.collect`: a line is an image of 1-2 MB in base64), each put in place and
  recorded by the run core's recorder (`done` only once durable, sizes checked as online), and a
  line whose image is already recorded is skipped.
- Retryable lines (429, 5xx) go into the next job, as `pipeline.retry` decides for online items;
  refusals and permanent errors are recorded as online ones are. After collection the job's files
  are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp

from pipeline import collect
from pipeline.core import RunCore, output_identity
from pipeline.download import Downloader, StoredImage
from pipeline.errors import ItemError
from pipeline.events import EventKind
from pipeline.item import Item, Status
from pipeline.manifest import iter_items
from pipeline.plan import Step, plan_items
from pipeline.providers import BatchJob, connect_batch
from pipeline.retry import Action, for_item
from pipeline.state import OPEN_STAGES

MAX_POLL_S = 300.0  # polls back off to this
STEP_TRIES = 3  # submitting or polling, tried this often through transient failures before the run stops
LINES_PER_WORKER = 2  # results lines in the works at once, per worker process
LINE_OVERHEAD = 1024  # bytes of a JSONL line besides its prompt and reference images


def line_bytes(item: Item) -> int:
    """About how large an item's JSONL line is: its prompt, the request around it, and its local
    reference images in base64 (a URL's size is not known here)."""
    references = sum(
        Path(ref).stat().st_size * 4 // 3
        for ref in item.images
        if not ref.startswith(("http://", "https://"))
    )
    return len(item.prompt.encode()) + LINE_OVERHEAD + references


class BatchRunner(RunCore):
    """The batch mode: items packed into jobs, submitted, polled, collected (`mode: batch`)."""

    async def _work(self) -> None:
        self._endpoint = self.options.endpoints[0]
        self._tag = hashlib.sha256(output_identity(self.store).encode()).hexdigest()[:8]
        self._submissions: Counter[str] = Counter()  # jobs each item went into during this run
        self._attempts: Counter[str] = Counter()  # attempts that counted, per item, this run
        self._throttles: Counter[str] = Counter()  # 429 lines, per item, this run (they cost none)
        self._settled: set[str] = set()  # items recorded failed this run: into no further job
        self._collected: set[str] = set()  # items whose image this run recorded
        self._jobs = {"created": 0, "adopted": 0, "collected": 0, "ended": 0}
        self._workers: ProcessPoolExecutor | None = None
        self._collect_s = 0.0  # reading results files, all jobs
        try:
            await self._session()
        except ItemError as exc:  # the batch API itself failed: every job stays recorded
            reason = f"{self._endpoint.spec.name}: {exc.message}"
            if exc.retryable:  # still failing after its tries: try later (exit 75)
                self.summary.outage = reason
            else:
                self.summary.fatal = reason
        finally:
            if self._workers is not None:
                self._workers.shutdown(cancel_futures=True)
            figures = {"batch_jobs": dict(self._jobs), "collect_s": round(self._collect_s, 3)}
            self.summary.providers = {self._endpoint.spec.name: figures}

    async def _session(self) -> None:
        endpoint = self._endpoint
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            self._api = connect_batch(
                endpoint.spec, session, endpoint.base_url, endpoint.key, self.manifest.catalog
            )
            self._writer = Downloader(
                session, self.store, max_bytes=self._max_bytes, timeout_s=endpoint.spec.read_timeout_s
            )
            try:
                await self._poll_loop()
            finally:
                self._writer.close()

    @property
    def _max_bytes(self) -> int:
        return int(self.manifest.download_max_mb * 1_000_000)

    async def _poll_loop(self) -> None:
        settings = self.manifest.batch
        await self._retrying(self._poll_all)
        await self._retrying(self._submit, True)
        if self.options.submit_only:
            self.stop("submitted")
            return
        if self._state.batches(OPEN_STAGES):
            self._start_workers()  # ready by the time a job has results (they start in about a second)
        deadline = time.monotonic() + settings.max_wait_s
        interval = settings.poll_interval_s
        answered = time.monotonic()  # the batch API's last answer
        while self._state.batches(OPEN_STAGES) and not self._stopping.is_set():
            if time.monotonic() >= deadline:
                self.stop("max_wait")
                return
            await self._pause(min(interval, deadline - time.monotonic()))
            if self._stopping.is_set():
                return
            interval = min(interval * 1.5, max(MAX_POLL_S, settings.poll_interval_s))
            try:
                if await self._poll_all():
                    await self._submit()  # items given back (retryable lines, ended jobs): a new job
                answered = time.monotonic()
            except ItemError as exc:
                if not exc.retryable:
                    raise
                if time.monotonic() - answered >= self.manifest.max_outage_s:
                    raise  # down for max_outage_s: the jobs stay recorded for a later run
                self.summary.retries[exc.kind] += 1  # the provider hiccuped: the next poll tries again
                self._event(EventKind.BATCH_WARNING, f"{exc.message}; polling again")

    def _start_workers(self) -> None:
        if self._workers is None:
            count = collect.size(self.manifest.batch.workers)
            self._workers = collect.workers(count)
            for _ in range(count):
                self._workers.submit(os.getpid)  # each spawns a process, which imports in the background

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
                await asyncio.sleep(self._backoff(attempt))

    # Submitting

    async def _submit(self, first: bool = False) -> None:
        """Every item that needs a generation and is in no open job, into jobs of `max_requests` (and
        of no more lines or bytes than the provider takes in one file). The first pass of a run also
        counts what was done or failed for good before it."""
        chunk: list[Item] = []
        size = 0  # the job's input file, estimated
        budget = self.options.max_requests
        for item, row, step in plan_items(self.manifest, self._state, self.store, self.options.retry_failed):
            if self._stopping.is_set():
                return
            if step is Step.DONE:
                self.summary.skipped += first and item.name not in self._collected  # done before this run
                continue
            if step is Step.FAILED:
                if first and row:
                    self.summary.failed[row.error_type or "error"] += 1
                continue
            if item.name in self._settled or self._state.in_open_batch(item):
                continue
            if step is Step.DOWNLOAD and row and row.url and await self._fetch_recorded(item, row.url):
                continue
            if self._submissions[item.name] >= self.manifest.max_attempts + self._throttles[item.name]:
                continue  # in as many jobs as it may be this run (lines missing from their results)
            if budget is not None and self.summary.requests + len(chunk) >= budget:
                self.stop("max_requests")
                break
            line = line_bytes(item)
            if chunk and size + line > self._api.max_bytes:
                await self._new_job(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += line
            if len(chunk) == min(self.manifest.batch.max_requests, self._api.max_requests):
                await self._new_job(chunk)
                chunk, size = [], 0
        if chunk:
            await self._new_job(chunk)

    async def _fetch_recorded(self, item: Item, url: str) -> bool:
        """An online run's paid URL, still fresh: download it rather than pay for a batch line."""
        try:
            stored = await self._writer.fetch(url, item.name)
        except ItemError:
            return False
        await self._record_image(item, stored, None)
        return True

    async def _new_job(self, items: list[Item]) -> None:
        display_name = f"imggen-{self._tag}-{self._state.batch_count() + 1:04d}"
        self._state.add_batch(display_name, self._endpoint.spec.name, items)
        await self.recorder.durable()  # recorded, with its items, before anything is sent
        for item in items:
            self._submissions[item.name] += 1
        self.summary.requests += len(items)
        path = self.store.spool / f"{display_name}.jsonl"
        async with aiofiles.open(path, "w") as out:
            for item in items:
                await out.write(json.dumps(await self._api.line(item)) + "\n")
        input_file = await self._api.upload(path, display_name)
        path.unlink()
        self._state.update_batch(display_name, input_file=input_file)
        await self.recorder.durable()
        await self._create(display_name, input_file)

    async def _create(self, display_name: str, input_file: str) -> None:
        model = self._endpoint.spec.model or self.manifest.item_model
        try:
            job = await self._api.create(model, display_name, input_file)
        except ItemError as exc:
            if not exc.retryable:
                raise
            found = await self._api.find(display_name)  # the reply may be lost, not the job
            if found is None:
                return  # still `creating`: the next poll (or run) looks again, then creates
            job = found
            self._jobs["adopted"] += 1
        else:
            self._jobs["created"] += 1
        await self._activate(display_name, job)

    async def _activate(self, display_name: str, job: BatchJob) -> None:
        self._state.update_batch(display_name, name=job.name, stage="active", remote_state=job.state)
        await self.recorder.durable()
        self._event(EventKind.BATCH_SUBMITTED, f"{display_name} ({job.name})")

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
            remote = await self._api.get(job.name)
            self._state.update_batch(job.display_name, remote_state=remote.state)
            if remote.phase == "succeeded":
                given_back |= await self._collect(job.display_name, job.input_file, remote.results)
            elif remote.phase == "ended":
                self._state.update_batch(job.display_name, stage="ended")
                self._jobs["ended"] += 1
                self._event(
                    EventKind.BATCH_ENDED,
                    f"{job.display_name}: {remote.state}; its {job.items} items go back",
                )
                await self._delete(job.input_file)
                given_back = True
            await self.recorder.durable()
        return given_back

    async def _resume_create(self, display_name: str, input_file: str | None) -> None:
        found = await self._api.find(display_name)
        if found is not None:
            self._jobs["adopted"] += 1
            await self._activate(display_name, found)
            return
        if input_file is None:  # died before the upload finished: the job is made again, same items
            self._state.update_batch(display_name, stage="ended", remote_state="NEVER_CREATED")
            await self.recorder.durable()
            return
        await self._create(display_name, input_file)

    async def _collect(self, display_name: str, input_file: str | None, results: tuple[str, ...]) -> bool:
        members = self._state.batch_members(display_name)
        items = {
            item.name: item
            for item in iter_items(self.manifest)
            if item.name in members and members[item.name][2] == item.fingerprint
        }
        outcomes: Counter[str] = Counter()
        for n, results_file in enumerate(results):  # the results, then (OpenAI) the errors
            path = self.store.spool / f"{display_name}.results-{n}.jsonl"
            await self._api.download(results_file, path)
            started = time.monotonic()
            await self._read_results(path, items, outcomes)
            path.unlink()
            self._collect_s += time.monotonic() - started
        done, failed, given_back = outcomes["done"], outcomes["failed"], outcomes["retry"]
        self._state.update_batch(
            display_name, stage="collected", results_file=" ".join(results), done=done, failed=failed
        )
        await self.recorder.durable()
        self._jobs["collected"] += 1
        self._event(
            EventKind.BATCH_COLLECTED,
            f"{display_name}: {done} images, {failed} failed, {given_back} to retry",
        )
        for name in (input_file, *results):
            await self._delete(name)
        return given_back > 0 or done + failed < len(members)  # a key with no line goes into a later job

    async def _read_results(self, path: Path, items: dict[str, Item], outcomes: Counter[str]) -> None:
        """Every line of a results file, a few per worker process at once."""
        self._start_workers()
        room = asyncio.Semaphore(LINES_PER_WORKER * collect.size(self.manifest.batch.workers))
        async with asyncio.TaskGroup() as group:
            offset = 0
            with path.open("rb") as lines:  # no line-length cap: a line holds a whole image
                for n, raw in enumerate(lines):
                    await room.acquire()
                    task = group.create_task(self._line(path, offset, len(raw), n, items, outcomes))
                    task.add_done_callback(lambda _: room.release())
                    offset += len(raw)
                    del raw

    async def _line(
        self, path: Any, offset: int, length: int, n: int, items: dict[str, Item], outcomes: Counter[str]
    ) -> None:
        """One results line, decoded and verified by a worker process, then recorded: done, failed,
        retry, or skipped."""
        tmp = self.store.spool / f"{path.stem}.{n}.part"
        try:
            loop = asyncio.get_running_loop()
            prepared = await loop.run_in_executor(
                self._workers,
                collect.prepare,
                str(path),
                offset,
                length,
                str(tmp),
                self._max_bytes,
                self.store.local is not None,
                self._api.protocol,
            )
            outcomes[await self._record_line(prepared, tmp, items)] += 1
        finally:
            tmp.unlink(missing_ok=True)

    async def _record_line(self, prepared: collect.Prepared, tmp: Any, items: dict[str, Item]) -> str:
        item = items.get(str(prepared.key)) if prepared.key is not None else None
        if item is None:
            return "skipped"  # unreadable, not ours, or the manifest changed the item since
        row = self._state.get(item)
        if row is not None and row.status == Status.DONE and row.image_fp == item.fingerprint:
            return "skipped"  # recorded when these results were read before a crash
        error = prepared.item_error()
        if error is not None:
            return self._failed(item, error)
        assert prepared.spooled is not None
        ext, width, height, digest, size = prepared.spooled
        relative = f"images/{item.name}.{ext}"
        await asyncio.to_thread(self.store.put, tmp, relative, replace=True)
        stored = StoredImage(relative, digest, size, width, height)
        await self._record_image(item, stored, row.file if row else None, prepared.served_model)
        return "done"

    def _failed(self, item: Item, error: ItemError) -> str:
        decision = for_item(
            error, self._attempts[item.name], self._throttles[item.name], self.manifest.max_attempts
        )
        self._throttles[item.name] += not decision.costs_attempt
        self._attempts[item.name] += decision.costs_attempt
        if decision.action is Action.RETRY:
            self.summary.retries[error.kind] += 1
            return "retry"
        if decision.action is Action.STOP:  # the provider, not the item: it stays resumable
            self._no_provider(error)
            return "skipped"
        self._settled.add(item.name)
        self.recorder.fail(item, error, self._attempts[item.name], self._endpoint.spec.name)
        return "failed"

    async def _record_image(
        self, item: Item, stored: StoredImage, old_file: str | None, served_model: str | None = None
    ) -> None:
        self.summary.downloads += 1
        self._collected.add(item.name)
        await self.recorder.image(
            item, stored, old_file, self._endpoint.spec.name, {"served_model": served_model}
        )

    async def _delete(self, name: str | None) -> None:
        """Files API storage is limited (and kept 48 h): delete what was collected, quietly."""
        if name:
            with contextlib.suppress(ItemError):
                await self._api.delete_file(name)

    def _event(self, kind: EventKind, message: str) -> None:
        self._emit(kind, None, message, self._endpoint.spec.name)
