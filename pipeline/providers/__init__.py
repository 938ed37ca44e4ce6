"""Providers: where generation requests go. One module per wire protocol, and the pool that routes.

A protocol implements `Client`: `generate(item)` sends one paid request and returns the image
references found (http(s) URLs or `data:` URIs), or raises the `ItemError` the reply amounts to. Each
protocol keeps its request body and its reply classification as pure functions beside it.

    openai_chat   POST {base_url}/chat/completions (OpenAI-compatible gateways and relays)
    gemini        POST {base_url}/v1beta/models/{model}:generateContent (Google's native API)
    http          one request to a provider's API: timeouts, aiohttp's exceptions as ours, no redirects
    controller    per-provider concurrency that finds the provider's limit; a circuit breaker
    pool          routes each request to a provider with room, by priority; failover; accounting

The runner talks to a `Pool` only and never knows which protocol it is driving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol as _Protocol

import aiohttp

from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.secret import Secret


@dataclass(frozen=True, slots=True)
class Generated:
    """A successful reply: its image references, and the provider's rate-limit headers if any."""

    refs: list[str]
    remaining: int | None = None  # requests left in the current window
    reset_s: float | None = None  # until the window resets


class Client(_Protocol):
    async def generate(self, item: Item) -> Generated: ...


def connect(spec: ProviderSpec, session: aiohttp.ClientSession, base_url: str, key: Secret) -> Client:
    """The client for a provider's protocol."""
    from pipeline.providers.gemini import GeminiClient
    from pipeline.providers.openai_chat import OpenAIChatClient

    kind = GeminiClient if spec.protocol == "gemini" else OpenAIChatClient
    return kind(session, base_url, key, spec)
