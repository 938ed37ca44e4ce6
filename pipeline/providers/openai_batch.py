"""OpenAI's Batch API for images on the wire (shared contract `provider-api-openai-images.md`, section
4): a JSONL file of `/v1/images/generations` requests uploaded to `/files` (`purpose: batch`), a
batch created from it with our display name in its `metadata` (so a lost create reply is found by
listing `/batches`), polled, its output and error files downloaded, collected files deleted.

Failures become the pipeline's errors as for the Images API: retryable (network, 5xx, 429), fatal
for the provider (bad key, no quota), permanent otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp

from pipeline.catalog import Catalog, shipped
from pipeline.classify import classify_data, parse_json
from pipeline.errors import ItemError, PermanentError, RetryableError
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.providers import BatchJob
from pipeline.providers.http import send
from pipeline.providers.openai_images import images_outcome, request_fields, size_for
from pipeline.secret import Secret

ENDPOINT = "/v1/images/generations"
NAME_KEY = "imggen_job"  # the metadata key that carries our deterministic job name
DOWNLOAD_CHUNK = 1 << 20
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
COLLECTED = ("completed", "expired")  # an expired batch returns what it made; the rest goes back


def job_of(batch: dict[str, Any]) -> BatchJob:
    """A batch object as the runner sees it (pure)."""
    status = str(batch.get("status"))
    files = tuple(str(batch[key]) for key in ("output_file_id", "error_file_id") if batch.get(key))
    if status in COLLECTED:
        return BatchJob(str(batch.get("id")), status, "succeeded", files)
    return BatchJob(str(batch.get("id")), status, "open" if status in OPEN else "ended")


def read_line(line: dict[str, Any]) -> tuple[str | None, list[str] | ItemError, str | None]:
    """A results (or errors) line: its item's key, its outcome, and the model that served it."""
    key = line.get("custom_id")
    given = line.get("response")
    response: dict[str, Any] = given if isinstance(given, dict) else {}
    error = line.get("error")
    if isinstance(error, dict) and not response:
        outcome = images_outcome(500 if error.get("code") == "server_error" else 400, {}, {"error": error})
        return str(key), outcome if isinstance(outcome, ItemError) else PermanentError("bad line"), None
    body = response.get("body")
    outcome = images_outcome(int(response.get("status_code") or 500), {}, body)
    served = body.get("model") if isinstance(body, dict) else None
    refs = outcome if isinstance(outcome, ItemError) else outcome[0]
    return str(key), refs, served if isinstance(served, str) else None


class OpenAIBatchClient:
    protocol = "openai-images"
    max_requests = 50_000  # lines per input file
    max_bytes = 200_000_000  # bytes per input file

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        key: Secret,
        spec: ProviderSpec,
        catalog: Catalog | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = key
        self._spec = spec
        self._catalog = catalog or shipped()
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=spec.read_timeout_s)

    async def line(self, item: Item) -> dict[str, Any]:
        size = size_for(item, self._spec.model or item.model, self._catalog)
        body = request_fields(item, self._spec, size)
        return {"custom_id": item.name, "method": "POST", "url": ENDPOINT, "body": body}

    async def upload(self, path: Path, display_name: str) -> str:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        async with aiofiles.open(path, "rb") as handle:
            form.add_field(
                "file",
                await handle.read(),
                filename=f"{display_name}.jsonl",
                content_type="application/jsonl",
            )
        reply = await self._call("POST", "/files", form)
        ident = reply.get("id")
        if not isinstance(ident, str):
            raise RetryableError("file upload: no id in the reply", kind="server_error")
        return ident

    async def create(self, model: str, display_name: str, input_file: str) -> BatchJob:
        body = {
            "input_file_id": input_file,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {NAME_KEY: display_name},
        }
        return job_of(await self._call("POST", "/batches", body))

    async def get(self, name: str) -> BatchJob:
        return job_of(await self._call("GET", f"/batches/{name}"))

    async def find(self, display_name: str) -> BatchJob | None:
        """The batch with this name in its metadata, looked for on every page of the list."""
        after = ""
        while True:
            reply = await self._call("GET", "/batches?limit=100" + (f"&after={after}" if after else ""))
            for batch in reply.get("data") or []:
                if isinstance(batch, dict) and (batch.get("metadata") or {}).get(NAME_KEY) == display_name:
                    return job_of(batch)
            after = str(reply.get("last_id") or "")
            if not reply.get("has_more") or not after:
                return None

    async def download(self, name: str, dest: Path) -> None:
        """Stream a file (a batch's output or errors) to `dest`, never holding it in memory."""
        url = f"{self._base}/files/{name}/content"
        try:
            async with self._session.get(url, headers=self._auth(), timeout=self._timeout) as resp:
                if resp.status != 200:
                    text = (await resp.read()).decode("utf-8", "replace")
                    raise self._error(resp.status, text)
                async with aiofiles.open(dest, "wb") as out:
                    async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                        await out.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(f"results download failed: {type(exc).__name__}", kind="network") from exc

    async def delete_file(self, name: str) -> None:
        await self._call("DELETE", f"/files/{name}")

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key.reveal()}"}

    def _error(self, status: int, text: str) -> ItemError:
        outcome = classify_data(status, {}, parse_json(text), text)
        error = (
            outcome
            if isinstance(outcome, ItemError)
            else RetryableError(f"HTTP {status}", kind="server_error")
        )
        return self._key.scrub(error)

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        status, _, raw = await send(
            self._session, method, f"{self._base}{path}", body, self._auth(), self._timeout, self._key
        )
        text = raw.decode("utf-8", "replace")
        if status != 200:
            raise self._error(status, text)
        data = json.loads(text) if text.startswith("{") else {}
        return data if isinstance(data, dict) else {}
