"""Google's Batch Mode on the wire (shared contract `provider-api-gemini.md`, section 3): upload a JSONL
file with the resumable protocol, create a job from it, get and list jobs, download and delete files.

Every call carries the key in `x-goog-api-key`, except the upload chunks, whose URL grants access.
Failures become the pipeline's errors as in `gemini`: retryable (network, 5xx, 429), fatal for the
provider (bad key, 403), permanent otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import aiohttp

from pipeline.classify import parse_json
from pipeline.errors import ItemError, RetryableError
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.providers import BatchJob
from pipeline.providers.gemini import GeminiClient, error_of, request_body, results_line
from pipeline.providers.http import send
from pipeline.secret import Secret

UPLOAD_CHUNK = 8 * 1024 * 1024  # as the SDK sends them
DOWNLOAD_CHUNK = 1 << 20
API = "v1beta"
SUCCEEDED = "BATCH_STATE_SUCCEEDED"
ENDED = ("BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED")


def job_of(operation: dict[str, Any]) -> BatchJob:
    """A batch operation as the runner sees it (pure): SUCCEEDED with its results file to collect
    (it can come before the file's name: then still open), the ended states, or open."""
    metadata = operation.get("metadata") or {}
    state = str(metadata.get("state"))
    output = metadata.get("output") or operation.get("response") or {}
    if state == SUCCEEDED and output.get("responsesFile"):
        return BatchJob(str(operation.get("name")), state, "succeeded", (str(output["responsesFile"]),))
    return BatchJob(str(operation.get("name")), state, "ended" if state in ENDED else "open")


def read_line(line: dict[str, Any]) -> tuple[str | None, list[str] | ItemError, str | None]:
    """A results line: its item's key, its outcome, and the model that served it."""
    response = line.get("response")
    served = response.get("modelVersion") if isinstance(response, dict) else None
    return str(line.get("key")), results_line(line), served if isinstance(served, str) else None


class BatchClient:
    protocol = "gemini"
    max_requests = 1_000_000  # the input file's limit is in bytes
    max_bytes = 2_000_000_000

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, key: Secret, spec: ProviderSpec
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._key = key
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=spec.read_timeout_s)
        self._references = GeminiClient(session, base_url, key, spec)

    async def line(self, item: Item) -> dict[str, Any]:
        """The item's JSONL line: its key and its generateContent request, reference images inline."""
        inline = [await self._references.inline_reference(ref) for ref in item.images]
        return {"key": item.name, "request": request_body(item, inline)}

    async def upload(self, path: Path, display_name: str) -> str:
        """Upload a file; its name (`files/<id>`)."""
        size = (await aiofiles.os.stat(path)).st_size
        headers = {
            "X-Goog-Upload-Protocol": "resumable",
            "X-Goog-Upload-Command": "start",
            "X-Goog-Upload-Header-Content-Length": str(size),
            "X-Goog-Upload-Header-Content-Type": "jsonl",
        }
        body = {"file": {"display_name": display_name}}
        _, reply_headers = await self._call("POST", f"/upload/{API}/files", body, headers)
        url = reply_headers.get("x-goog-upload-url")
        if not url:
            raise RetryableError("upload start: no x-goog-upload-url in the reply", kind="server_error")
        offset, reply = 0, dict[str, Any]()
        async with aiofiles.open(path, "rb") as handle:
            while True:
                chunk = await handle.read(UPLOAD_CHUNK)
                last = offset + len(chunk) >= size
                command = "upload, finalize" if last else "upload"
                chunk_headers = {"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)}
                reply, _ = await self._call("POST", url, chunk, chunk_headers, keyed=False)
                offset += len(chunk)
                if last:
                    break
        name = (reply.get("file") or {}).get("name")
        if not isinstance(name, str):
            raise RetryableError("upload finalize: no file name in the reply", kind="server_error")
        return name

    async def create(self, model: str, display_name: str, input_file: str) -> BatchJob:
        body = {"batch": {"displayName": display_name, "inputConfig": {"fileName": input_file}}}
        reply, _ = await self._call("POST", f"/{API}/models/{model}:batchGenerateContent", body)
        return job_of(reply)

    async def get(self, name: str) -> BatchJob:
        reply, _ = await self._call("GET", f"/{API}/{name}")
        return job_of(reply)

    async def find(self, display_name: str) -> BatchJob | None:
        """The job with this display name, looked for on every page of the list."""
        token = ""
        while True:
            reply, _ = await self._call("GET", f"/{API}/batches" + (f"?pageToken={token}" if token else ""))
            for operation in reply.get("operations") or []:
                if (operation.get("metadata") or {}).get("displayName") == display_name:
                    return job_of(operation)
            token = str(reply.get("nextPageToken") or "")
            if not token:
                return None

    async def delete_file(self, name: str) -> None:
        await self._call("DELETE", f"/{API}/{name}")

    async def download(self, name: str, dest: Path) -> None:
        """Stream a file (a job's results) to `dest`, never holding it in memory."""
        ident = name.removeprefix("files/")
        url = f"{self._base}/download/{API}/files/{ident}:download?alt=media"
        try:
            async with self._session.get(url, headers=self._auth(), timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise error_of(resp.status, parse_json((await resp.read()).decode("utf-8", "replace")))
                async with aiofiles.open(dest, "wb") as out:
                    async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK):
                        await out.write(chunk)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RetryableError(f"results download failed: {type(exc).__name__}", kind="network") from exc

    def _auth(self) -> dict[str, str]:
        return {"x-goog-api-key": self._key.reveal()}

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        keyed: bool = True,
    ) -> tuple[dict[str, Any], dict[str, str]]:
        url = path if path.startswith("http") else f"{self._base}{path}"
        sent = {**(self._auth() if keyed else {}), **(headers or {})}
        status, reply_headers, raw = await send(
            self._session, method, url, body, sent, self._timeout, self._key
        )
        text = raw.decode("utf-8", "replace")
        data = parse_json(text) if text else {}
        if status != 200:
            error: ItemError = error_of(status, data, None, text)
            raise self._key.scrub(error)
        return (data if isinstance(data, dict) else {}), reply_headers
