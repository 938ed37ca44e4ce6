"""The simulator's side of the wire: what a request asks for, and the replies and errors of each
protocol (the OpenAI-compatible gateway, Google's native API), as the shared contracts describe them.
"""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web
from PIL import Image

from pipeline.catalog import shipped
from pipeline.extract import decode_data_uri


@dataclass(frozen=True)
class _Asked:
    """What a generation request asks for, whatever its protocol."""

    model: str
    prompt: str
    aspect_ratio: str | None
    image_size: str | None
    inputs: list[bytes]
    service_tier: str | None = None  # native: flex asked for
    pixels: tuple[int, int] | None = None  # images API: the exact size asked for


def _parse_request(body: Any) -> _Asked:
    """What a chat-completions request body asks for, or ValueError saying what a gateway would."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or shipped().find(model) is None:
        raise ValueError(f"model {model!r} is not served here")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise ValueError("messages must be a non-empty list")
    content = messages[-1].get("content")
    inputs = []
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        for part in parts:
            url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
            if url.startswith("data:"):
                inputs.append(decode_data_uri(url))
        content = " ".join(p.get("text", "") for p in parts)
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the user message has no text")
    google = (body.get("extra_body") or {}).get("google") or {}
    if "imageConfig" in google:
        raise ValueError("unknown field imageConfig: use image_config")
    config = google.get("image_config") or {}
    return _Asked(
        model, content, *_image_config(model, config.get("aspect_ratio"), config.get("image_size")), inputs
    )


def _image_config(model: str, ratio: Any, image_size: Any) -> tuple[str | None, str | None]:
    """The aspect ratio and image size asked for, as the model takes them (ValueError if it does not)."""
    spec = shipped().find(model)
    assert spec is not None
    if ratio is not None and not (isinstance(ratio, str) and spec.takes_ratio(ratio)):
        raise ValueError(f"invalid aspect_ratio {ratio!r}")
    if spec.image_sizes and image_size is not None and image_size not in spec.image_sizes:
        raise ValueError(f"invalid image_size {image_size!r}: one of {', '.join(spec.image_sizes)}")
    return ratio, image_size if spec.image_sizes else None  # a model without sizes ignores it


def _parse_native(model: str, body: Any) -> _Asked:
    """What a native generateContent body asks for (either casing), or ValueError as Google says it."""
    if shipped().find(model) is None:
        raise ValueError(f"models/{model} is not found")
    if not isinstance(body, dict):
        raise ValueError("Invalid JSON payload received.")
    unknown = set(body) - NATIVE_FIELDS
    if unknown:
        raise ValueError(f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents or not isinstance(contents[-1], dict):
        raise ValueError("contents must be a non-empty list")
    texts, inputs = [], []
    for part in contents[-1].get("parts") or []:
        inline = part.get("inlineData") or part.get("inline_data") if isinstance(part, dict) else None
        if isinstance(inline, dict):
            inputs.append(_lenient_base64(str(inline.get("data", ""))))
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            texts.append(part["text"])
    if not "".join(texts).strip():
        raise ValueError("the request has no text")
    config = body.get("generationConfig") or body.get("generation_config") or {}
    modalities = config.get("responseModalities") or config.get("response_modalities") or []
    if any(m not in ("TEXT", "IMAGE") for m in modalities):
        raise ValueError(f"invalid responseModalities {modalities!r}")
    image = config.get("imageConfig") or config.get("image_config") or {}
    ratio = image.get("aspectRatio") or image.get("aspect_ratio")
    size = image.get("imageSize") or image.get("image_size")
    tier = body.get("service_tier") or body.get("serviceTier")
    if tier not in (None, "standard", "flex", "priority"):
        raise ValueError(f"Invalid value at 'service_tier' ({tier!r})")
    return _Asked(model, " ".join(texts), *_image_config(model, ratio, size), inputs, tier)


NATIVE_FIELDS = {
    "contents",
    "service_tier",
    "serviceTier",
    "generationConfig",
    "generation_config",
    "safetySettings",
    "safety_settings",
    "systemInstruction",
    "system_instruction",
    "tools",
    "toolConfig",
    "tool_config",
    "cachedContent",
}


def _lenient_base64(data: str) -> bytes:
    """Either alphabet, with or without padding (the SDK sends URL-safe base64)."""
    try:
        return base64.b64decode(
            data.replace("-", "+").replace("_", "/") + "=" * (-len(data) % 4), validate=True
        )
    except ValueError as exc:
        raise ValueError("inlineData.data is not base64") from exc


class OpenAIWire:
    """The OpenAI-compatible gateway's side of the wire: its auth, bodies and errors."""

    def authorized(self, request: web.Request, key: str) -> bool:
        return request.headers.get("Authorization") == f"Bearer {key}"

    def unauthorized(self, request: web.Request) -> web.Response:
        return _error(401, "Invalid token (request id: sim-auth)", "invalid_request_error", "invalid_api_key")

    def throttled(self, wait: float | None) -> web.Response:
        reply = _error(429, "上游负载已饱和 (request id: sim-429)", "rate_limit_error", None)
        if wait is not None:
            reply.headers["Retry-After"] = f"{wait:g}"
        return reply

    def quota_exhausted(self) -> web.Response:
        return _error(
            429, "上游负载已饱和 (request id: sim-quota)", "insufficient_quota", "insufficient_quota"
        )

    async def read(self, request: web.Request) -> tuple[_Asked, bool]:
        """What the request asks for, and whether it asks for a stream (ValueError if it is wrong)."""
        body = await request.json()
        return self.parse(body), isinstance(body, dict) and body.get("stream") is True

    def parse(self, body: Any) -> _Asked:
        return _parse_request(body)

    def bad_request(self, message: str) -> web.Response:
        return _error(400, message, "invalid_request_error", None)

    def retired(self, model: str) -> web.Response:
        message = f"The model {model} has been deprecated"
        return _error(404, message, "invalid_request_error", "model_not_found")

    def server_error(self, status: int) -> web.Response:
        page = f"<html><head><title>{status} Bad Gateway</title></head><body>nginx</body></html>"
        return web.Response(status=status, text=page, content_type="text/html")

    async def refused(self, request: web.Request, stream: bool, prompt_blocked: bool) -> web.StreamResponse:
        return await _send(request, [_completion("I can't help with that.", "content_filter")], stream)

    async def no_image(self, request: web.Request, stream: bool) -> web.StreamResponse:
        return await _send(request, [_completion("Here is a kitten, in words.", "stop")], stream)


class NativeWire:
    """Google's side of the wire (generateContent): `x-goog-api-key` (or `?key=`), camelCase replies,
    refusals on HTTP 200, errors with `status` and `details`."""

    def __init__(self, model: str) -> None:
        self.model = model

    def authorized(self, request: web.Request, key: str) -> bool:
        return (request.headers.get("x-goog-api-key") or request.query.get("key")) == key

    def unauthorized(self, request: web.Request) -> web.Response:
        if not (request.headers.get("x-goog-api-key") or request.query.get("key")):
            return _google_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        return _google_error(
            400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [reason]
        )

    def throttled(self, wait: float | None) -> web.Response:
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}],
            },
        ]
        if wait is not None:
            details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{wait:g}s"})
        return _google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", details)

    def quota_exhausted(self) -> web.Response:
        return _google_error(429, "RESOURCE_EXHAUSTED", "Your prepayment credits are depleted.")

    async def read(self, request: web.Request) -> tuple[_Asked, bool]:
        return self.parse(await request.json()), False

    def parse(self, body: Any) -> _Asked:
        return _parse_native(self.model, body)

    def retired(self, model: str) -> web.Response:
        message = f"models/{model} is not found for API version v1beta, or is not supported for"
        message += " generateContent."
        return _google_error(404, "NOT_FOUND", message)

    def bad_request(self, message: str) -> web.Response:
        if "is not found" in message:
            return _google_error(404, "NOT_FOUND", message)
        return _google_error(400, "INVALID_ARGUMENT", message)

    def server_error(self, status: int) -> web.Response:
        name = {500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE"}[status]
        return _google_error(status, name, "The model is overloaded. Please try again later.")

    async def refused(self, request: web.Request, stream: bool, prompt_blocked: bool) -> web.StreamResponse:
        if prompt_blocked:
            return web.json_response({"promptFeedback": {"blockReason": "SAFETY"}})
        candidate = {"content": {}, "finishReason": "IMAGE_SAFETY", "finishMessage": "blocked", "index": 0}
        return web.json_response({"candidates": [candidate]})

    async def no_image(self, request: web.Request, stream: bool) -> web.StreamResponse:
        return web.json_response({"candidates": [{"content": {}, "finishReason": "NO_IMAGE", "index": 0}]})


class ImagesWire(OpenAIWire):
    """OpenAI's Images API: generations (JSON) and edits (multipart, `image[]` files); `b64_json`
    replies with token `usage`; `moderation_blocked` refusals (shared/provider-api-openai-images.md)."""

    edit = False

    async def read(self, request: web.Request) -> tuple[_Asked, bool]:
        if not self.edit:
            return self.parse(await request.json()), False
        fields: dict[str, Any] = {}
        inputs = []
        async for part in await request.multipart():
            if isinstance(part, BodyPartReader) and part.name in ("image[]", "image"):
                inputs.append(bytes(await part.read()))
            elif isinstance(part, BodyPartReader) and part.name:
                fields[part.name] = await part.text()
        if not inputs:
            raise ValueError("image[] is required for an edit")
        return _parse_images(fields, inputs), False

    def parse(self, body: Any) -> _Asked:
        return _parse_images(body, [])

    async def refused(self, request: web.Request, stream: bool, prompt_blocked: bool) -> web.StreamResponse:
        message = "Your request was rejected as a result of our safety system."
        return _error(400, message, "image_generation_user_error", "moderation_blocked")

    async def no_image(self, request: web.Request, stream: bool) -> web.StreamResponse:
        return web.json_response({"created": int(time.time()), "data": []})


def _parse_images(body: Any, inputs: list[bytes]) -> _Asked:
    """What an images request asks for (section 1), or ValueError as OpenAI words it."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    model = str(body.get("model"))
    known = shipped().find(model)
    if known is None or "openai-images" not in known.entry.protocols:
        raise ValueError(f"The model {model!r} does not exist or is not served on this endpoint")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt is required")
    if str(body.get("n", 1)) != "1":
        raise ValueError("this simulator makes n=1")
    size = str(body.get("size") or "auto")
    if size == "auto":
        return _Asked(model, prompt, None, None, inputs)
    match = re.fullmatch(r"([1-9]\d{1,4})x([1-9]\d{1,4})", size)
    if match is None:
        raise ValueError(f"Invalid size {size!r}")
    width, height = int(match.group(1)), int(match.group(2))
    bounds = known.entry.any_ratio
    if bounds and (width % bounds.multiple_of or height % bounds.multiple_of):
        raise ValueError(f"Invalid size {size!r}: both sides must be multiples of {bounds.multiple_of}")
    ratio_ok = bounds is None or bounds.min_ratio <= width / height <= bounds.max_ratio
    if not ratio_ok or width * height > 8_294_400:
        raise ValueError(f"Invalid size {size!r}: the ratio or area is out of range")
    return _Asked(model, prompt, f"{width}:{height}", None, inputs, pixels=(width, height))


def with_provenance(png: bytes) -> bytes:
    """A PNG with a C2PA-style `caBX` chunk before IEND, as OpenAI's images carry: proof that the bytes
    were stored as sent, never re-encoded."""
    payload = b"c2pa: simulated provenance manifest"
    chunk = struct.pack(">I", len(payload)) + b"caBX" + payload
    chunk += struct.pack(">I", zlib.crc32(b"caBX" + payload) & 0xFFFFFFFF)
    return png[:-12] + chunk + png[-12:]  # IEND is the last 12 bytes


def images_reply(png: bytes, model: str) -> dict[str, Any]:
    usage = {
        "input_tokens": 50,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
        "output_tokens": 1056,
        "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0},
        "total_tokens": 1106,
    }
    return {
        "created": int(time.time()),
        "model": model,
        "output_format": "png",
        "data": [{"b64_json": base64.b64encode(with_provenance(png)).decode(), "revised_prompt": None}],
        "usage": usage,
    }


Wire = OpenAIWire | NativeWire | ImagesWire


def _native_image(model: str, png: bytes, service_tier: str | None = None) -> dict[str, Any]:
    part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}
    candidate = {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
    usage: dict[str, Any] = {"promptTokenCount": 16, "candidatesTokenCount": 1290, "totalTokenCount": 1306}
    if service_tier:
        usage["serviceTier"] = service_tier
    return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model}


def _google_error(
    status: int, name: str, message: str, details: list[dict[str, Any]] | None = None
) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": name}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except OSError as exc:
        raise ValueError("an input image does not decode") from exc


def _completion(
    message: str | dict[str, Any], finish_reason: str | None, delta: bool = False
) -> dict[str, Any]:
    now = int(time.time())
    body = message if isinstance(message, dict) else {"content": message}
    return {
        "id": f"gemini-{now}",
        "object": "chat.completion.chunk" if delta else "chat.completion",
        "created": now,
        "model": "gemini-2.5-flash-image",
        "choices": [
            {
                "index": 0,
                "finish_reason": finish_reason,
                "delta" if delta else "message": {"role": "assistant", **body},
            }
        ],
    }


def _split_message(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A message as two deltas: text content cut in the middle (clients must join before scanning)."""
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return [message]
    middle = len(content) // 2
    return [{**message, "content": content[:middle]}, {"content": content[middle:]}]


async def _send(request: web.Request, chunks: list[dict[str, Any]], stream: bool) -> web.StreamResponse:
    """Chunks as server-sent events (with a comment, a usage-only chunk and [DONE]), or as one JSON body."""
    if not stream:
        return web.json_response(_merge(chunks))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b": PROCESSING\n\n")
    usage = {"choices": [], "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
    for chunk in [*chunks, usage]:
        await response.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _merge(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Streaming chunks folded into the one non-streaming body a gateway would send."""
    if len(chunks) == 1 and "choices" not in chunks[0]:
        return chunks[0]
    finish, message = None, {"role": "assistant", "content": ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice.get("delta") or choice.get("message") or {}
            for key, value in delta.items():
                joinable = isinstance(value, str) and isinstance(message.get(key), str) and key == "content"
                message[key] = message[key] + value if joinable else value
            finish = choice.get("finish_reason") or finish
    merged = _completion(message, finish)
    merged["model"] = chunks[-1].get("model", merged["model"])
    return merged


def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    error = {"message": message, "type": kind, "param": None, "code": code}
    return web.json_response({"error": error}, status=status)


async def _truncated(request: web.Request, png: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    response.content_length = len(png)
    await response.prepare(request)
    await response.write(png[: len(png) // 2])
    assert request.transport is not None
    request.transport.close()
    return response
