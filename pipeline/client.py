"""The chat-completions client: one paid generation request per call, its reply classified.

aiohttp's exceptions become the pipeline's errors here and nowhere else. The API key goes only into
the `Authorization` header of requests to `base_url`; redirects from the API are not followed.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.classify import classify, classify_data
from pipeline.errors import ItemError, NoImageError, RetryableError
from pipeline.manifest import Item
from pipeline.secret import Secret
from pipeline.sse import assemble_stream

MAX_REPLY_BYTES = 256 * 1024 * 1024


def request_body(item: Item, stream: bool = False, image_urls: list[str] | None = None) -> dict[str, Any]:
    """The body of provider contract section 1, `extra_body` as a literal top-level key.

    Reference images go as OpenAI-style content parts after the text; without an aspect ratio
    (an edit that keeps its input's size) there is no `image_config`.
    """
    content: str | list[dict[str, Any]] = item.prompt
    if image_urls:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content = [{"type": "text", "text": item.prompt}, *parts]
    body: dict[str, Any] = {"model": item.model, "messages": [{"role": "user", "content": content}]}
    config = {"aspect_ratio": item.aspect_ratio, "image_size": item.image_size}
    config = {key: value for key, value in config.items() if value}
    if config:
        body["extra_body"] = {"google": {"image_config": config}}
    if stream:
        body["stream"] = True
    return body


def reference_data_uri(path: str) -> str:
    """A local reference image as a data: URI."""
    data = Path(path).read_bytes()
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class Client:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        key: Secret,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        stream: bool = False,
    ) -> None:
        self._session = session
        self._stream = stream
        self._references: dict[str, str] = {}
        self._url = f"{base_url.rstrip('/')}/chat/completions"
        self._key = key
        self._timeout = aiohttp.ClientTimeout(
            total=timeout_s + connect_timeout_s, sock_connect=connect_timeout_s, sock_read=timeout_s
        )

    async def generate(self, item: Item) -> list[str]:
        """The image references of one generation, or raise the ItemError the reply amounts to."""
        headers = {"Authorization": f"Bearer {self._key.reveal()}"}
        urls = [await self._reference(ref) for ref in item.images]
        try:
            async with self._session.post(
                self._url,
                json=request_body(item, self._stream, urls),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                body = await _read_capped(resp)
                status, reply_headers = resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except TimeoutError as exc:
            raise RetryableError("generation request timed out", kind="timeout") from exc
        except aiohttp.ClientError as exc:
            reason = self._key.redact(str(exc) or type(exc).__name__)
            raise RetryableError(f"connection failed: {reason}", kind="network") from exc
        outcome = self._classify(status, reply_headers, body)
        if isinstance(outcome, ItemError):
            outcome.message = self._key.redact(outcome.message)
            outcome.args = (outcome.message,)
            raise outcome
        return outcome

    async def _reference(self, ref: str) -> str:
        """An image reference as sent: a URL as is, a file as a data: URI read once per run."""
        if ref.startswith(("http://", "https://")):
            return ref
        if ref not in self._references:
            self._references[ref] = await asyncio.to_thread(reference_data_uri, ref)
        return self._references[ref]

    def _classify(self, status: int, headers: dict[str, str], body: bytes) -> list[str] | ItemError:
        if not (status == 200 and "text/event-stream" in headers.get("content-type", "")):
            return classify(status, headers, body)
        reply, complete = assemble_stream(body)
        outcome = classify_data(status, headers, reply)
        if isinstance(outcome, NoImageError) and not complete:
            return RetryableError("the event stream ended early", kind="server_error")
        return outcome


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise RetryableError(f"reply larger than {MAX_REPLY_BYTES} bytes", kind="server_error")
        chunks.append(chunk)
    return b"".join(chunks)
