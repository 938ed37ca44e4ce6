"""The OpenAI-compatible chat-completions protocol: one paid generation request per call, its reply
classified (`pipeline.classify`, provider contract sections 1 and 2).

The API key goes only into the `Authorization` header of requests to `base_url` (sent through
`providers.http`, which turns aiohttp's exceptions into the pipeline's and follows no redirect).
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.classify import classify, classify_data, rate_headers, reply_field
from pipeline.errors import ItemError, NoImageError, RetryableError
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.providers import Generated
from pipeline.providers.http import request_timeout, send
from pipeline.secret import Secret
from pipeline.sse import assemble_stream


def request_body(
    item: Item, stream: bool = False, image_urls: list[str] | None = None, model: str | None = None
) -> dict[str, Any]:
    """The body of provider contract section 1, `extra_body` as a literal top-level key.

    Reference images go as OpenAI-style content parts after the text; without an aspect ratio
    (an edit that keeps its input's size) there is no `image_config`.
    """
    content: str | list[dict[str, Any]] = item.prompt
    if image_urls:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content = [{"type": "text", "text": item.prompt}, *parts]
    body: dict[str, Any] = {"model": model or item.model, "messages": [{"role": "user", "content": content}]}
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


class OpenAIChatClient:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, key: Secret, spec: ProviderSpec
    ) -> None:
        self._session = session
        self._stream = spec.stream
        self._model = spec.model
        self._references: dict[str, str] = {}
        self._url = f"{base_url.rstrip('/')}/chat/completions"
        self._key = key
        self._timeout = request_timeout(spec)

    async def generate(self, item: Item) -> Generated:
        """The image references of one generation, or raise the ItemError the reply amounts to."""
        headers = {"Authorization": f"Bearer {self._key.reveal()}"}
        urls = [await self._reference(ref) for ref in item.images]
        body = request_body(item, self._stream, urls, self._model)
        status, reply_headers, reply = await send(
            self._session, "POST", self._url, body, headers, self._timeout, self._key
        )
        outcome = self._classify(status, reply_headers, reply)
        if isinstance(outcome, ItemError):
            raise self._key.scrub(outcome)
        return Generated(outcome, *rate_headers(reply_headers), reply_field(reply, "model"))

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
