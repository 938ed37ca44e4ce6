"""Providers: where generation requests go. One module per wire protocol, and the pool that routes.

A protocol implements `Client`: `generate(item)` sends one paid request and returns the image
references found (http(s) URLs or `data:` URIs), or raises the `ItemError` the reply amounts to. Each
protocol keeps its request body and its reply classification as pure functions beside it.

    openai_chat   POST {base_url}/chat/completions (OpenAI-compatible gateways and relays)
    openai_images POST {base_url}/images/generations and /images/edits (OpenAI's Images API)
    gemini        POST {base_url}/v1beta/models/{model}:generateContent (Google's native API)
    gemini_batch  Google's Files and Batch Mode (`BatchApi`)
    openai_batch  OpenAI's Files and Batch API for images (`BatchApi`)
    http          one request to a provider's API: timeouts, aiohttp's exceptions as ours, no redirects
    controller    per-provider concurrency that finds the provider's limit; a circuit breaker
    pool          routes each request to a provider with room, by priority; failover; accounting

The runner talks to a `Pool` only and never knows which protocol it is driving.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from typing import Protocol as _Protocol

import aiohttp

from pipeline.catalog import Catalog
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.secret import Secret


@dataclass(frozen=True, slots=True)
class Generated:
    """A successful reply: its image references, and the provider's rate-limit headers if any."""

    refs: list[str]
    remaining: int | None = None  # requests left in the current window
    reset_s: float | None = None  # until the window resets
    served_model: str | None = None  # the model the reply says made the image (`model`, `modelVersion`)
    service_tier: str | None = None  # the tier that served it (`usageMetadata.serviceTier`)
    usage: dict[str, int] | None = None  # tokens by kind (input_text, output_image, ...), for the cost


class Client(_Protocol):
    async def generate(self, item: Item) -> Generated: ...


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A provider's batch job as the batch runner sees it, whatever its API."""

    name: str  # the provider's id for it
    state: str  # the provider's own word for its state (recorded as is)
    phase: Literal["open", "succeeded", "ended"]  # wait / collect `results` / give the items back
    results: tuple[str, ...] = ()  # files to collect: its results (and, on OpenAI, its errors)


class BatchApi(_Protocol):
    """A provider's batch API on the wire: one JSONL line per item, a file upload, jobs that carry our
    deterministic display name (so a lost create reply is adopted by listing), results downloaded
    to a file. `read_line` (pure, beside each wire) turns a results line into the item's outcome."""

    protocol: str
    max_requests: int  # lines per input file the provider accepts
    max_bytes: int  # and bytes

    async def line(self, item: Item) -> dict[str, Any]: ...

    async def upload(self, path: Path, display_name: str) -> str: ...

    async def create(self, model: str, display_name: str, input_file: str) -> BatchJob: ...

    async def get(self, name: str) -> BatchJob: ...

    async def find(self, display_name: str) -> BatchJob | None: ...

    async def download(self, name: str, dest: Path) -> None: ...

    async def delete_file(self, name: str) -> None: ...


def connect_batch(
    spec: ProviderSpec,
    session: aiohttp.ClientSession,
    base_url: str,
    key: Secret,
    catalog: Catalog | None = None,
) -> BatchApi:
    """The batch API of a provider's protocol."""
    from pipeline.providers.gemini_batch import BatchClient
    from pipeline.providers.openai_batch import OpenAIBatchClient

    if spec.protocol == "openai-images":
        return OpenAIBatchClient(session, base_url, key, spec, catalog)
    return BatchClient(session, base_url, key, spec)


def connect(
    spec: ProviderSpec,
    session: aiohttp.ClientSession,
    base_url: str,
    key: Secret,
    catalog: Catalog | None = None,
) -> Client:
    """The client for a provider's protocol (`catalog`: the models known, for the sizes to ask)."""
    from pipeline.providers.gemini import GeminiClient
    from pipeline.providers.openai_chat import OpenAIChatClient
    from pipeline.providers.openai_images import OpenAIImagesClient

    if spec.protocol == "openai-images":
        return OpenAIImagesClient(session, base_url, key, spec, catalog)
    kind = GeminiClient if spec.protocol == "gemini" else OpenAIChatClient
    return kind(session, base_url, key, spec)
