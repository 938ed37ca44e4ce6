"""The Files and Batch endpoints of Google's native API, as the simulator serves them (shared contract
`provider-api-gemini.md`, sections 3 and 4): resumable upload, create from a file or inline, get, list
with paging, cancel, delete, results download. File bytes live in a temporary folder, not in memory.

Knobs (on `SimConfig`): how long a job takes, the states jobs end in, per-line errors, and creates
whose reply is lost after the job was made.
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

from aiohttp import web

from pipeline.simulator.openai_batch import OpenAIBatchService

CHUNK = 1 << 20
BatchAnswer = Callable[[str, str, dict[str, Any]], dict[str, Any]]  # (model, key, request) -> results line


@dataclass
class SimFile:
    name: str  # files/<id>
    display_name: str
    path: Path
    size: int = 0
    mime: str = "jsonl"


@dataclass
class SimBatch:
    name: str  # batches/<id>
    display_name: str
    model: str
    input_file: str | None
    inline: list[dict[str, Any]] | None
    state: str = "BATCH_STATE_PENDING"
    created: float = field(default_factory=time.time)
    count: int = 0
    serial: int = 0  # the how-manieth job created (batch_end_states are taken in this order)
    output: dict[str, Any] | None = None

    def resource(self) -> dict[str, Any]:
        done = self.state in (
            "BATCH_STATE_SUCCEEDED",
            "BATCH_STATE_FAILED",
            "BATCH_STATE_CANCELLED",
            "BATCH_STATE_EXPIRED",
        )
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
            "model": f"models/{self.model}",
            "displayName": self.display_name,
            "state": self.state,
            "createTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "batchStats": {
                "requestCount": str(self.count),
                "pendingRequestCount": str(0 if done else self.count),
            },
        }
        if self.input_file:
            metadata["inputConfig"] = {"fileName": self.input_file}
        body: dict[str, Any] = {"name": self.name, "metadata": metadata}
        if self.output is not None:
            metadata["output"] = self.output
            body["response"] = {"@type": "type.googleapis.com/...GenerateContentBatchOutput", **self.output}
        if done:
            body["done"] = True
        if self.state == "BATCH_STATE_FAILED":
            body["error"] = {"code": 13, "message": "the batch failed"}
        return body


class BatchService:
    def __init__(
        self, config: Callable[[], Any], answer: BatchAnswer, openai: OpenAIBatchService | None = None
    ) -> None:
        self._config_of = config  # the simulator's SimConfig, read at each use (tests change it)
        self._answer = answer  # one results line for one request
        self._openai = openai  # OpenAI's batch service: the routes both APIs have are its for a bearer token
        self._made: Path | None = None  # the folder of file bytes, made at the first upload
        self.files: dict[str, SimFile] = {}
        self.batches: dict[str, SimBatch] = {}
        self._uploads: dict[str, SimFile] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._created = 0
        self.stats: dict[str, int] = {"uploads": 0, "creates": 0, "deleted_files": 0, "lost_creates": 0}

    def add_routes(self, app: web.Application) -> None:
        for v in ("v1beta", "v1"):
            app.router.add_post(f"/upload/{v}/files", self._start_upload)
            app.router.add_get(f"/{v}/files/{{call}}", self._file)
            app.router.add_delete(f"/{v}/files/{{call}}", self._delete_file)
            app.router.add_get(f"/download/{v}/files/{{call}}", self._file)
            app.router.add_get(f"/{v}/batches", self._list)
            app.router.add_get(f"/{v}/batches/{{call}}", self._get)
            app.router.add_post(f"/{v}/batches/{{call}}", self._action)
            app.router.add_delete(f"/{v}/batches/{{call}}", self._delete_batch)
        app.router.add_post("/_upload/{token}", self._chunk)

    def reset(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.files.clear()
        self.batches.clear()
        self._uploads.clear()
        self.stats = dict.fromkeys(self.stats, 0)
        self._created = 0
        self._drop_folder()

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._drop_folder()

    @property
    def _folder(self) -> Path:
        if self._made is None:
            self._made = Path(tempfile.mkdtemp(prefix="imagegen-sim-files-"))
        return self._made

    def _drop_folder(self) -> None:
        if self._made is not None:
            shutil.rmtree(self._made, ignore_errors=True)
            self._made = None

    # Auth and errors

    def _denied(self, request: web.Request) -> web.Response | None:
        given = request.headers.get("x-goog-api-key") or request.query.get("key")
        if given == self._config_of().key:
            return None
        if not given:
            return _error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [reason])

    # Files

    async def _start_upload(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if request.headers.get("X-Goog-Upload-Protocol") != "resumable":
            return _error(400, "INVALID_ARGUMENT", "only the resumable upload protocol is served here")
        body = await request.json() if request.can_read_body else {}
        meta = body.get("file") or {}
        ident = secrets.token_hex(6)
        file = SimFile(
            f"files/{ident}",
            str(meta.get("display_name") or meta.get("displayName") or ""),
            self._folder / ident,
        )
        file.path.write_bytes(b"")
        token = secrets.token_hex(16)
        self._uploads[token] = file
        origin = f"{request.scheme}://{request.host}"
        return web.json_response(
            {}, headers={"x-goog-upload-url": f"{origin}/_upload/{token}", "X-Goog-Upload-Status": "active"}
        )

    async def _chunk(self, request: web.Request) -> web.Response:
        file = self._uploads.get(request.match_info["token"])
        if file is None:
            return _error(404, "NOT_FOUND", "no such upload")
        command = request.headers.get("X-Goog-Upload-Command", "")
        offset = int(request.headers.get("X-Goog-Upload-Offset", "0"))
        if offset != file.size:
            return _error(400, "INVALID_ARGUMENT", f"offset {offset}, expected {file.size}")
        with file.path.open("ab") as out:
            async for chunk in request.content.iter_chunked(CHUNK):
                out.write(chunk)
                file.size += len(chunk)
        if "finalize" not in command:
            return web.json_response({}, headers={"X-Goog-Upload-Status": "active"})
        del self._uploads[request.match_info["token"]]
        self.files[file.name] = file
        self.stats["uploads"] += 1
        return web.json_response(
            {"file": self._file_resource(file)}, headers={"X-Goog-Upload-Status": "final"}
        )

    def _file_resource(self, file: SimFile) -> dict[str, Any]:
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 48 * 3600))
        return {
            "name": file.name,
            "displayName": file.display_name,
            "mimeType": file.mime,
            "sizeBytes": str(file.size),
            "state": "ACTIVE",
            "expirationTime": expires,
        }

    async def _file(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        ident, _, method = request.match_info["call"].partition(":")
        file = self.files.get(f"files/{ident}")
        if file is None:
            return _error(404, "NOT_FOUND", f"files/{ident} not found")
        if method != "download":
            return web.json_response(self._file_resource(file))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = file.size
        await response.prepare(request)
        with file.path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        if self._openai is not None and self._openai.answers(request):
            return await self._openai.shared(request, request.match_info["call"])
        if (denied := self._denied(request)) is not None:
            return denied
        file = self.files.pop(f"files/{request.match_info['call']}", None)
        if file is None:
            return _error(404, "NOT_FOUND", "no such file")
        file.path.unlink(missing_ok=True)
        self.stats["deleted_files"] += 1
        return web.json_response({})

    # Batches

    async def create(self, request: web.Request, model: str) -> web.StreamResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        body = (await request.json()).get("batch") or {}
        config = body.get("inputConfig") or body.get("input_config") or {}
        file_name = config.get("fileName") or config.get("file_name")
        inline = (config.get("requests") or {}).get("requests")
        if file_name is None and inline is None:
            return _error(400, "INVALID_ARGUMENT", "inputConfig needs fileName or requests")
        if file_name is not None and file_name not in self.files:
            return _error(404, "NOT_FOUND", f"{file_name} not found")
        ident = secrets.token_hex(12)
        batch = SimBatch(
            f"batches/{ident}",
            str(body.get("displayName") or body.get("display_name") or ""),
            model,
            file_name,
            inline,
        )
        batch.count = len(inline) if inline is not None else _count_lines(self.files[str(file_name)].path)
        batch.serial, self._created = self._created, self._created + 1
        self.batches[batch.name] = batch
        self.stats["creates"] += 1
        task = asyncio.create_task(self._process(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        sim = self._config_of()
        if self.stats["lost_creates"] < sim.batch_lose_creates:
            self.stats["lost_creates"] += 1
            assert request.transport is not None
            request.transport.close()  # the job exists, the client never hears of it
            return web.Response(status=499)
        return web.json_response(batch.resource())

    async def _process(self, batch: SimBatch) -> None:
        sim = self._config_of()
        await asyncio.sleep(sim.batch_duration_s / 2)
        if batch.state != "BATCH_STATE_PENDING":
            return
        batch.state = "BATCH_STATE_RUNNING"
        await asyncio.sleep(sim.batch_duration_s / 2)
        if batch.state != "BATCH_STATE_RUNNING":
            return
        ends = sim.batch_end_states  # the end state of each job, in the order they were created
        end = ends[batch.serial] if batch.serial < len(ends) else "SUCCEEDED"
        if end != "SUCCEEDED":
            batch.state = f"BATCH_STATE_{end}"
            return
        if batch.inline is not None:
            keys = [str((r.get("metadata") or {}).get("key", i)) for i, r in enumerate(batch.inline)]
            lines = [
                self._answer(batch.model, k, r.get("request") or {})
                for k, r in zip(keys, batch.inline, strict=True)
            ]
            batch.output = {"inlinedResponses": {"inlinedResponses": [_inlined(line) for line in lines]}}
        else:
            ident = batch.name.removeprefix("batches/")
            result = SimFile(f"files/batch-{ident}", f"batch-{ident}", self._folder / f"batch-{ident}")
            await asyncio.to_thread(self._write_results, batch, result)
            self.files[result.name] = result
            batch.output = {"responsesFile": result.name}
        batch.state = "BATCH_STATE_SUCCEEDED"

    def _write_results(self, batch: SimBatch, result: SimFile) -> None:
        assert batch.input_file is not None
        with self.files[batch.input_file].path.open("rb") as lines, result.path.open("w") as out:
            for raw in lines:
                if raw.strip():
                    line = json.loads(raw)
                    answer = self._answer(batch.model, str(line.get("key")), line.get("request") or {})
                    out.write(json.dumps(answer) + "\n")
        result.size = result.path.stat().st_size

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if self._openai is not None and self._openai.answers(request):
            return await self._openai.shared(request, request.match_info["call"])
        if (denied := self._denied(request)) is not None:
            return denied
        if self._config_of().batch_polls_fail:
            return _error(503, "UNAVAILABLE", "The service is currently unavailable.")
        batch = self.batches.get(f"batches/{request.match_info['call']}")
        if batch is None:
            return _error(404, "NOT_FOUND", "no such batch")
        return web.json_response(batch.resource())

    async def _list(self, request: web.Request) -> web.StreamResponse:
        if self._openai is not None and self._openai.answers(request):
            return await self._openai.shared(request, None)
        if (denied := self._denied(request)) is not None:
            return denied
        size = int(request.query.get("pageSize") or self._config_of().batch_page_size)
        start = int(request.query.get("pageToken") or 0)
        names = list(self.batches)
        page = [self.batches[name].resource() for name in names[start : start + size]]
        body: dict[str, Any] = {"operations": page}
        if start + size < len(names):
            body["nextPageToken"] = str(start + size)
        return web.json_response(body)

    async def _action(self, request: web.Request) -> web.Response:
        ident, _, method = request.match_info["call"].partition(":")
        if method == "delete":
            return await self._delete_batch(request, ident)
        if (denied := self._denied(request)) is not None:
            return denied
        batch = self.batches.get(f"batches/{ident}")
        if batch is None or method != "cancel":
            return _error(404, "NOT_FOUND", "no such batch or method")
        if batch.state in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING"):
            batch.state = "BATCH_STATE_CANCELLED"
        return web.json_response({})

    async def _delete_batch(self, request: web.Request, ident: str | None = None) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if self.batches.pop(f"batches/{ident or request.match_info['call']}", None) is None:
            return _error(404, "NOT_FOUND", "no such batch")
        return web.json_response({})


def _inlined(line: dict[str, Any]) -> dict[str, Any]:
    key = line.pop("key")
    return {**line, "metadata": {"key": key}}


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def _error(status: int, name: str, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)
