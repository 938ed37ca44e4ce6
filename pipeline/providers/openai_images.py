"""OpenAI's Images API (`protocol: openai-images`), or a relay serving it: generations, and edits for
items with reference images (shared contract `provider-api-openai-images.md`, sections 1-3).

`POST {base_url}/images/generations` takes JSON; `POST {base_url}/images/edits` takes a multipart form
with the reference images as repeated `image[]` files (up to 16). We always ask for one image (`n: 1`:
one item, one paid image) at the size the model's catalog entry gives for the item's ratio and
image size. The image comes back as `data[0].b64_json` (or a URL, from some relays) and goes through
the same verified write path as every other image, its bytes never re-encoded (a PNG's C2PA chunk
survives as sent). The reply's token `usage` is handed on, for the cost.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.catalog import Catalog, shipped
from pipeline.classify import classify_data, clip, parse_json, rate_headers, reply_field
from pipeline.errors import FatalError, ItemError, NoImageError, RefusalError
from pipeline.item import Item
from pipeline.manifest import ProviderSpec
from pipeline.providers import Generated
from pipeline.providers.http import fetch_reference, request_timeout, send
from pipeline.secret import Secret

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
REFUSAL_CODES = {"moderation_blocked", "image_generation_user_error", "content_policy_violation"}
NO_MONEY_CODES = {
    "insufficient_quota",
    "billing_hard_limit_reached",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
}
USAGE = {  # the reply's usage fields -> the catalog's token prices
    ("input_tokens_details", "text_tokens"): "input_text",
    ("input_tokens_details", "image_tokens"): "input_image",
    ("output_tokens_details", "image_tokens"): "output_image",
    ("output_tokens_details", "text_tokens"): "output_text",
}


def size_for(item: Item, model: str, catalog: Catalog) -> str:
    """The `size` to ask for: the catalog's pixels for the item's ratio and image size; `auto` for an
    edit that keeps its input's size, or a model the catalog does not know."""
    known = catalog.find(model)
    if item.aspect_ratio is None or known is None:
        return "auto"
    width, height = known.pixels(item.aspect_ratio, item.image_size)
    return f"{width}x{height}"


def request_fields(item: Item, spec: ProviderSpec, size: str) -> dict[str, Any]:
    """The fields of a generation or an edit (section 1): one image, the provider's options."""
    fields: dict[str, Any] = {"model": spec.model or item.model, "prompt": item.prompt, "n": 1, "size": size}
    options: dict[str, str | None] = {
        "quality": spec.quality,
        "output_format": spec.output_format,
        "background": spec.background,
        "moderation": spec.moderation,
    }
    options |= dict(item.options)  # the job's own over the provider's
    return fields | {key: value for key, value in options.items() if value}


def classify_images(
    status: int, headers: dict[str, str], body: bytes
) -> tuple[list[str], dict[str, int]] | ItemError:
    """The image (as a data: URI, or a relay's URL) and the token usage, or the error (section 3)."""
    text = body.decode("utf-8", "replace").strip()
    return images_outcome(status, headers, parse_json(text), text)


def images_outcome(
    status: int, headers: dict[str, str], data: Any, text: str = ""
) -> tuple[list[str], dict[str, int]] | ItemError:
    """As `classify_images`, for a reply already parsed (a batch results line's `response.body`)."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        codes = {str(error.get(key)).lower() for key in ("code", "type") if error.get(key)}
        message = clip(str(error.get("message") or "") + "".join(f" code={c}" for c in sorted(codes)))
        if codes & REFUSAL_CODES:
            return RefusalError(message)
        if codes & NO_MONEY_CODES:
            return FatalError(f"no quota left: {message}", kind="quota")
    if status != 200 or not isinstance(data, dict) or isinstance(error, dict):
        outcome = classify_data(status, headers, data, text or json.dumps(data)[:2000])
        return outcome if isinstance(outcome, ItemError) else NoImageError("reply has no image")
    images = [image for image in data.get("data") or [] if isinstance(image, dict)]
    if not images:
        return NoImageError("reply has no image (data is empty)")
    first = images[0]
    mime = MIME.get(str(data.get("output_format") or "png"), "image/png")
    if isinstance(first.get("b64_json"), str) and first["b64_json"]:
        return [f"data:{mime};base64,{first['b64_json']}"], usage_of(data.get("usage"))
    if isinstance(first.get("url"), str) and first["url"].startswith(("http://", "https://", "data:")):
        return [first["url"]], usage_of(data.get("usage"))
    return NoImageError("reply has no image (neither b64_json nor url)")


def usage_of(usage: Any) -> dict[str, int]:
    """Tokens by kind, as the catalog prices them."""
    if not isinstance(usage, dict):
        return {}
    found = {}
    for (group, field), kind in USAGE.items():
        details = usage.get(group)
        count = details.get(field) if isinstance(details, dict) else None
        if isinstance(count, int) and count > 0:
            found[kind] = count
    return found


class OpenAIImagesClient:
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
        self._timeout = request_timeout(spec)
        self._files: dict[str, tuple[bytes, str]] = {}

    async def generate(self, item: Item) -> Generated:
        headers = {"Authorization": f"Bearer {self._key.reveal()}"}
        fields = request_fields(
            item, self._spec, size_for(item, self._spec.model or item.model, self._catalog)
        )
        body: dict[str, Any] | aiohttp.FormData = fields
        url = f"{self._base}/images/generations"
        if item.images:  # an edit: the reference images as files
            url, body = f"{self._base}/images/edits", await self._form(item, fields)
        status, reply_headers, reply = await send(
            self._session, "POST", url, body, headers, self._timeout, self._key
        )
        outcome = classify_images(status, reply_headers, reply)
        if isinstance(outcome, ItemError):
            raise self._key.scrub(outcome)
        refs, usage = outcome
        return Generated(refs, *rate_headers(reply_headers), reply_field(reply, "model"), usage=usage)

    async def _form(self, item: Item, fields: dict[str, Any]) -> aiohttp.FormData:
        """The edit's multipart form: each reference image as an `image[]` file (section 2)."""
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, str(value))
        for n, ref in enumerate(item.images):
            data, mime = await self._reference(ref)
            form.add_field(
                "image[]",
                data,
                filename=f"image-{n}{mimetypes.guess_extension(mime) or '.png'}",
                content_type=mime,
            )
        return form

    async def _reference(self, ref: str) -> tuple[bytes, str]:
        """A reference image's bytes and type, read or fetched once per run (never with the key)."""
        if ref not in self._files:
            if ref.startswith(("http://", "https://")):
                self._files[ref] = await fetch_reference(self._session, ref, self._timeout)
            else:
                data = await asyncio.to_thread(Path(ref).read_bytes)
                self._files[ref] = (data, mimetypes.guess_type(ref)[0] or "image/png")
        return self._files[ref]
