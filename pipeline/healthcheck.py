"""Dead-man's-switch pings (healthchecks.io style): `<url>/start`, then `<url>` or `<url>/fail`.

A ping has a short timeout and its failure never fails the run. It never carries the API key.
"""

from __future__ import annotations

import aiohttp

PING_TIMEOUT = aiohttp.ClientTimeout(total=5)


async def ping(session: aiohttp.ClientSession, url: str | None, suffix: str = "") -> bool:
    """Whether the ping was answered with a 2xx status."""
    if not url:
        return False
    try:
        async with session.get(f"{url}{suffix}", timeout=PING_TIMEOUT) as resp:
            return 200 <= resp.status < 300
    except (aiohttp.ClientError, TimeoutError):
        return False
