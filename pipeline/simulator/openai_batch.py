"""OpenAI's Files and Batch endpoints, as the simulator serves them (shared contract
`provider-api-openai-images.md`, section 4): multipart upload (`purpose: batch`), file content and
delete, batches created from a file with `metadata`, get, list (newest first, `after`, `has_more`),
cancel. Results go to an output file and failed lines to an error file, in no particular order.
File bytes live in a temporary folder, not in memory.

The same knobs as Google's batch: how long a job takes, the states jobs end in (an expired batch
keeps the lines it made and leaves the rest undone), per-line errors, lost create replies, page size.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

CHUNK = 1 << 20
# (custom_id, body) -> (a results line, whether it goes to the error file)
Answer = Callable[[str, dict[str, Any]], tuple[dict[str, Any], bool]]
ENDS = {"FAILED": "failed", "CANCELLED": "cancelled", "EXPIRED": "expired"}


@dataclass
class OpenAIBatch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str]
    serial: int
    status: str = "validating"
    created_at: int = field(default_factory=lambda: int(time.time()))
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})

    def resource(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86_400,
            "request_counts": dict(self.counts),
            "metadata": dict(self.metadata),
        }


class OpenAIBatchService:
    def __init__(self, config: Callable[[], Any], answer: Answer) -> None:
        self._config_of = config
        self._answer = answer
        self._made: Path | None = None
        self.files: dict[str, Path] = {}
        self.batches: dict[str, OpenAIBatch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {"uploads": 0, "creates": 0, "deleted_files": 0, "lost_creates": 0}

    def add_routes(self, app: web.Application) -> None:
        """The routes only OpenAI has; those Google's batch has too (listing, getting a batch,
        deleting a file) come through `answers` and Google's handlers."""
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)

    def answers(self, request: web.Request) -> bool:
        """Whether a request on a route both APIs have is OpenAI's (it carries a bearer token)."""
        return request.headers.get("Authorization", "").startswith("Bearer ")

    async def shared(self, request: web.Request, ident: str | None) -> web.StreamResponse:
        """A request on a shared route: the list, a batch, or a file's delete."""
        if request.method == "DELETE":
            return await self._delete_file(request, ident)
        if ident is None:
            return await self._list(request)
        return await self._get(request, ident)

    def reset(self) -> None:
        self.close()
        self.files.clear()
        self.batches.clear()
        self.stats = dict.fromkeys(self.stats, 0)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
            self._made = None

    def _path(self, ident: str) -> Path:
        if self._made is None:
            self._made = Path(tempfile.mkdtemp(prefix="imagegen-sim-openai-files-"))
        return self._made / ident

    def _denied(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == f"Bearer {self._config_of().key}":
            return None
        return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    async def _upload(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        purpose, ident, size, filename = "", f"file-{secrets.token_hex(12)}", 0, ""
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = await part.text()
            elif part.name == "file":
                filename = part.filename or "input.jsonl"
                with self._path(ident).open("wb") as out:
                    while chunk := await part.read_chunk(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
        if purpose != "batch" or not size:
            return _error(400, "purpose must be batch, with a file", "invalid_request_error", None)
        self.files[ident] = self._path(ident)
        self.stats["uploads"] += 1
        file = {"id": ident, "object": "file", "bytes": size, "created_at": int(time.time())}
        return web.json_response({**file, "filename": filename, "purpose": "batch", "status": "processed"})

    async def _content(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        path = self.files.get(request.match_info["id"])
        if path is None:
            return _error(404, "No such File object", "invalid_request_error", None)
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = path.stat().st_size
        await response.prepare(request)
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def _delete_file(self, request: web.Request, ident: str | None) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        ident = str(ident)
        path = self.files.pop(ident, None)
        if path is None:
            return _error(404, "No such File object", "invalid_request_error", None)
        path.unlink(missing_ok=True)
        self.stats["deleted_files"] += 1
        return web.json_response({"id": ident, "object": "file", "deleted": True})

    async def _create(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        input_file = str(body.get("input_file_id"))
        if input_file not in self.files:
            return _error(400, f"Invalid input_file_id {input_file}", "invalid_request_error", None)
        if body.get("endpoint") not in ("/v1/images/generations", "/v1/images/edits"):
            return _error(400, "this simulator batches images endpoints only", "invalid_request_error", None)
        batch = OpenAIBatch(
            f"batch_{secrets.token_hex(12)}",
            input_file,
            str(body["endpoint"]),
            {str(k): str(v) for k, v in (body.get("metadata") or {}).items()},
            self.stats["creates"],
        )
        self.batches[batch.id] = batch
        self.stats["creates"] += 1
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.stats["lost_creates"] < self._config_of().batch_lose_creates:
            self.stats["lost_creates"] += 1
            assert request.transport is not None
            request.transport.close()  # the batch exists, the client never hears of it
            return web.Response(status=499)
        return web.json_response(batch.resource())

    async def _process(self, batch: OpenAIBatch) -> None:
        sim = self._config_of()
        await asyncio.sleep(sim.batch_duration_s / 2)
        if batch.status != "validating":
            return
        batch.status = "in_progress"
        await asyncio.sleep(sim.batch_duration_s / 2)
        if batch.status != "in_progress":
            return
        ends = sim.batch_end_states
        end = ENDS.get(ends[batch.serial] if batch.serial < len(ends) else "", "completed")
        if end in ("failed", "cancelled"):
            batch.status = end
            return
        await asyncio.to_thread(self._write_results, batch, end == "expired")
        batch.status = end

    def _write_results(self, batch: OpenAIBatch, expired: bool) -> None:
        """The output and error files; an expired batch made only its first half."""
        with self.files[batch.input_file_id].open("rb") as handle:
            lines = [json.loads(raw) for raw in handle if raw.strip()]
        batch.counts["total"] = len(lines)
        made = lines[: len(lines) // 2] if expired else lines
        output, errors = f"file-{secrets.token_hex(12)}", f"file-{secrets.token_hex(12)}"
        with self._path(output).open("w") as out, self._path(errors).open("w") as err:
            for line in reversed(made):  # in no particular order
                answer, failed = self._answer(str(line.get("custom_id")), line.get("body") or {})
                (err if failed else out).write(json.dumps(answer) + "\n")
                batch.counts["failed" if failed else "completed"] += 1
        self.files[output], batch.output_file_id = self._path(output), output
        if batch.counts["failed"]:
            self.files[errors], batch.error_file_id = self._path(errors), errors
        else:
            self._path(errors).unlink()

    async def _get(self, request: web.Request, ident: str) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        batch = self.batches.get(ident)
        if batch is None:
            return _error(404, "No such Batch object", "invalid_request_error", None)
        return web.json_response(batch.resource())

    async def _list(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        limit = min(int(request.query.get("limit") or 20), self._config_of().batch_page_size)
        newest = list(reversed(self.batches))
        after = request.query.get("after")
        start = newest.index(after) + 1 if after in newest else 0
        page = [self.batches[ident].resource() for ident in newest[start : start + limit]]
        return web.json_response(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(newest),
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "No such Batch object", "invalid_request_error", None)
        if batch.status in ("validating", "in_progress"):
            batch.status = "cancelled"
        return web.json_response(batch.resource())


def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": code}}, status=status
    )
