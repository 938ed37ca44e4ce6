"""One HTTP exchange with a provider's API, for every protocol: aiohttp's exceptions become the
pipeline's errors here and nowhere else, and never carry the key. Replies are read whole, capped."""

from __future__ import annotations

from typing import Any

import aiohttp

from pipeline.errors import PermanentError, RetryableError
from pipeline.manifest import MAX_REFERENCE_BYTES, ProviderSpec
from pipeline.secret import Secret

MAX_REPLY_BYTES = 256 * 1024 * 1024


def request_timeout(spec: ProviderSpec) -> aiohttp.ClientTimeout:
    """Connect and read timeouts of their own: a generation may take minutes, a connect may not."""
    return aiohttp.ClientTimeout(
        total=spec.read_timeout_s + spec.connect_timeout_s,
        sock_connect=spec.connect_timeout_s,
        sock_read=spec.read_timeout_s,
    )


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: dict[str, Any] | bytes | aiohttp.FormData | None,
    headers: dict[str, str],
    limits: aiohttp.ClientTimeout,
    key: Secret,
) -> tuple[int, dict[str, str], bytes]:
    """One request (a JSON body, or raw bytes): its status, lower-cased headers and body; timeouts
    and connection failures as RetryableError. Redirects are not followed: the key stays here."""
    payload: dict[str, Any] = {"data": body} if isinstance(body, bytes | aiohttp.FormData) else {"json": body}
    try:
        async with session.request(
            method, url, headers=headers, timeout=limits, allow_redirects=False, **payload
        ) as resp:
            data = await _read_capped(resp)
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data
    except TimeoutError as exc:
        raise RetryableError(f"{method} {url.split('?')[0][:100]} timed out", kind="timeout") from exc
    except aiohttp.ClientError as exc:
        reason = key.redact(str(exc) or type(exc).__name__)
        raise RetryableError(f"connection failed: {reason}", kind="network") from exc


async def fetch_reference(
    session: aiohttp.ClientSession, url: str, limits: aiohttp.ClientTimeout
) -> tuple[bytes, str]:
    """A reference image at a URL (never sent the key): its bytes and type."""
    try:
        async with session.get(url, timeout=limits) as resp:
            if resp.status != 200:
                raise PermanentError(f"reference image {url[:80]}: HTTP {resp.status}", kind="bad_reference")
            data = await resp.content.read(MAX_REFERENCE_BYTES + 1)
            mime = resp.content_type or "image/png"
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise RetryableError(f"reference image {url[:80]}: {type(exc).__name__}", kind="network") from exc
    if len(data) > MAX_REFERENCE_BYTES:
        raise PermanentError(
            f"reference image {url[:80]}: larger than {MAX_REFERENCE_BYTES} bytes", kind="bad_reference"
        )
    return data, mime


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise RetryableError(f"reply larger than {MAX_REPLY_BYTES} bytes", kind="server_error")
        chunks.append(chunk)
    return b"".join(chunks)
