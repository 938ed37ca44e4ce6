"""Google's native API (`protocol: gemini`): generateContent, its reply classified (shared contract
`provider-api-gemini.md`, sections 1 and 2).

The key travels in the `x-goog-api-key` header, never in the URL (URLs end up in logs). Reference
images go inline as base64 `inlineData` parts; the image comes back the same way and is handed on as
a `data:` URI to the same verified write path as every other image.
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.classify import (
    DAILY_LIMIT,
    clip,
    daily_cap,
    describe_body,
    gemini_retry_delay,
    no_image,
    parse_json,
    parse_retry_after,
    reply_field,
    reply_number,
    retired,
)
from pipeline.errors import FatalError, ItemError, PermanentError, RefusalError, RetryableError
from pipeline.extract import extract_images
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.providers import Generated
from pipeline.providers.http import fetch_reference, request_timeout, send
from pipeline.secret import Secret

FATAL_STATUSES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION", "NOT_FOUND"}
NO_MONEY = re.compile(r"credit|billing|prepa", re.IGNORECASE)  # "prepayment credits are depleted"
FATAL_REASONS = {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED", "BILLING_DISABLED", "SERVICE_DISABLED"}


def request_body(
    item: Item, inline: list[tuple[str, str]] | None = None, service_tier: str | None = None
) -> dict[str, Any]:
    """The section 1 body: the prompt, then each reference image as (mime type, base64) inlineData;
    `service_tier` (flex: half price, minutes, sheddable) at the top level when asked for."""
    parts: list[dict[str, Any]] = [{"text": item.prompt}]
    parts += [{"inlineData": {"mimeType": mime, "data": data}} for mime, data in inline or ()]
    config: dict[str, Any] = {"responseModalities": ["IMAGE"]}
    image_config = {"aspectRatio": item.aspect_ratio, "imageSize": item.image_size}
    image_config = {key: value for key, value in image_config.items() if value}
    if image_config:
        config["imageConfig"] = image_config
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}
    if service_tier:
        body["service_tier"] = service_tier
    return body


def shed(outcome: ItemError, status: int, text: str) -> ItemError:
    """For a flex request: a 503, or a 429 that names no quota, is a request shed for capacity (not
    billed): tried again later at no attempt's cost. Other outcomes are returned as they are."""
    quota = "QuotaFailure" in text or bool(DAILY_LIMIT.search(text) or NO_MONEY.search(text))
    if status == 503 or (status == 429 and not quota):
        return RetryableError(f"flex request shed: {outcome.message}", kind="shed")
    return outcome


def classify_gemini(
    status: int, headers: dict[str, str], body: bytes, now: datetime | None = None
) -> list[str] | ItemError:
    """Images found (as data: URIs), or the error this native reply amounts to (section 2)."""
    text = body.decode("utf-8", "replace").strip()
    data = parse_json(text)
    now = now or datetime.now(UTC)
    retry_after = parse_retry_after(headers.get("retry-after"), now)
    if status != 200 or not isinstance(data, dict) or isinstance(data.get("error"), dict):
        return daily_cap(retired(error_of(status, data, retry_after, text), text), headers, text, now)
    return judge(data)


def error_of(status: int, data: Any, retry_after: float | None = None, text: str = "") -> ItemError:
    """The error a non-200 reply (or a 200 with an `error`, or a results line's `error`) amounts to."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return _from_error(status, error, retry_after)
    return _from_status(status, describe_body(status, text), retry_after)


def results_line(line: dict[str, Any]) -> list[str] | ItemError:
    """One line of a batch job's results: its `response` judged as a reply, or its `error`."""
    error = line.get("error")
    if isinstance(error, dict):
        if error.get("code") == 429:  # a line's 429 is the job's load, not an empty wallet: try again
            return RetryableError(clip(str(error.get("message") or "rate limited")), kind="rate_limited")
        return error_of(0, line)
    response = line.get("response")
    return (
        judge(response)
        if isinstance(response, dict)
        else error_of(500, None, None, "a line with no response")
    )


def judge(data: dict[str, Any]) -> list[str] | ItemError:
    """A successful (HTTP 200) reply: its images as data: URIs, or why there are none (section 2)."""
    images = extract_images(data)
    if images:
        return images
    feedback = data.get("promptFeedback") or {}
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        return RefusalError(f"prompt blocked by the provider: {feedback['blockReason']}")
    outcome = no_image(data)
    message = _finish_message(data)
    if message:
        outcome.message = clip(f"{outcome.message} ({message})")
        outcome.args = (outcome.message,)
    return outcome


def _from_error(status: int, error: dict[str, Any], retry_after: float | None) -> ItemError:
    code = error.get("code") if isinstance(error.get("code"), int) else None
    effective = status if status >= 400 else code or 500
    google_status = str(error.get("status") or "").upper()
    details = [d for d in error.get("details") or [] if isinstance(d, dict)]
    reasons = {str(d.get("reason")) for d in details if d.get("reason")}
    message = clip(" ".join(p for p in (google_status, str(error.get("message") or "")) if p) or "error")
    delay = retry_after if retry_after is not None else gemini_retry_delay(error)
    if reasons & FATAL_REASONS or google_status in FATAL_STATUSES or effective in (401, 402, 403, 404):
        return FatalError(message)
    if effective == 429:  # with RetryInfo a per-minute quota; without, the credits or the quota are gone
        if delay is None:
            return FatalError(f"quota exhausted: {message}", kind="quota")
        return RetryableError(message, retry_after=delay, kind="rate_limited")
    return _from_status(effective, message, delay)


def _from_status(status: int, message: str, retry_after: float | None) -> ItemError:
    if status in (401, 402, 403, 404):
        return FatalError(message)
    if status == 429:
        return RetryableError(message, retry_after=retry_after, kind="rate_limited")
    if status == 408 or status >= 500 or status < 300:
        return RetryableError(
            message, retry_after=retry_after, kind="timeout" if status == 408 else "server_error"
        )
    return PermanentError(message)


def _finish_message(data: dict[str, Any]) -> str:
    for candidate in data.get("candidates") or []:
        if isinstance(candidate, dict) and candidate.get("finishMessage"):
            return str(candidate["finishMessage"])[:200]
    return ""


class GeminiClient:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, key: Secret, spec: ProviderSpec
    ) -> None:
        self._session = session
        self._key = key
        self._model = spec.model
        self._tier = spec.service_tier
        self._base = base_url.rstrip("/")
        self._timeout = request_timeout(spec)
        self._inline: dict[str, tuple[str, str]] = {}

    async def generate(self, item: Item) -> Generated:
        url = f"{self._base}/v1beta/models/{self._model or item.model}:generateContent"
        inline = [await self.inline_reference(ref) for ref in item.images]
        headers = {"x-goog-api-key": self._key.reveal()}
        request = request_body(item, inline, self._tier)
        status, reply_headers, body = await send(
            self._session, "POST", url, request, headers, self._timeout, self._key
        )
        outcome = classify_gemini(status, reply_headers, body)
        if isinstance(outcome, ItemError):
            if self._tier == "flex":
                outcome = shed(outcome, status, body[:4096].decode("utf-8", "replace"))
            raise self._key.scrub(outcome)
        tier = reply_field(body, "serviceTier")
        made = reply_number(body, "candidatesTokenCount")  # the image's tokens (image-only replies)
        usage = {"output_image": made} if made else None
        return Generated(
            outcome, served_model=reply_field(body, "modelVersion"), service_tier=tier, usage=usage
        )

    async def inline_reference(self, ref: str) -> tuple[str, str]:
        """A reference image as (mime type, base64), read or fetched once per run (never with the key)."""
        if ref not in self._inline:
            if ref.startswith(("http://", "https://")):
                data, mime = await fetch_reference(self._session, ref, self._timeout)
            else:
                data = await asyncio.to_thread(Path(ref).read_bytes)
                mime = mimetypes.guess_type(ref)[0] or "image/png"
            self._inline[ref] = (mime, base64.b64encode(data).decode())
        return self._inline[ref]
