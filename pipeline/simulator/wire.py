"""The simulator's side of the wire: what a request asks for, and the replies and errors of each
protocol (the OpenAI-compatible gateway, Google's native API), as the shared contracts describe them.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from PIL import Image

from pipeline.extract import decode_data_uri
from pipeline.presets import MODELS, SEED


@dataclass(frozen=True)
class _Asked:
    """What a generation request asks for, whatever its protocol."""

    model: str
    prompt: str
    aspect_ratio: str | None
    image_size: str | None
    inputs: list[bytes]


def _parse_request(body: Any) -> _Asked:
    """What a chat-completions request body asks for, or ValueError saying what a gateway would."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    model = body.get("model")
    if model not in MODELS:
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
    spec = MODELS[model]
    if ratio is not None and ratio not in SEED.sizes[None]:
        raise ValueError(f"invalid aspect_ratio {ratio!r}")
    if spec.image_sizes and image_size is not None and image_size not in spec.image_sizes:
        raise ValueError(f"invalid image_size {image_size!r}: one of {', '.join(spec.image_sizes)}")
    return ratio, image_size if spec.image_sizes else None  # a model without sizes ignores it


def _parse_native(model: str, body: Any) -> _Asked:
    """What a native generateContent body asks for (either casing), or ValueError as Google says it."""
    if model not in MODELS:
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
    return _Asked(model, " ".join(texts), *_image_config(model, ratio, size), inputs)


NATIVE_FIELDS = {
    "contents",
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

    def parse(self, body: Any) -> _Asked:
        return _parse_request(body)

    def bad_request(self, message: str) -> web.Response:
        return _error(400, message, "invalid_request_error", None)

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

    def parse(self, body: Any) -> _Asked:
        return _parse_native(self.model, body)

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


Wire = OpenAIWire | NativeWire


def _native_image(model: str, png: bytes) -> dict[str, Any]:
    part = {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}
    candidate = {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
    usage = {"promptTokenCount": 16, "candidatesTokenCount": 1290, "totalTokenCount": 1306}
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
    return _completion(message, finish)


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
