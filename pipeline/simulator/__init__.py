"""The provider's stand-in: an OpenAI-compatible gateway plus an image host, on two loopback ports.

It follows the provider contract: it checks the bearer key and the body like a gateway (400 on a bad
aspect ratio, camelCase keys refused), answers with a markdown image link to a signed, expiring URL
on the other origin, and serves real PNGs of the preset's exact size whose pictures differ per
prompt. Latency and faults are knobs; each fault is drawn from a generator seeded with the prompt
and how many times it was asked, so a run's faults do not depend on request order.
The demo, the tests and the benchmark all use it; `stats` counts what it saw.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from aiohttp import web
from PIL import Image, ImageDraw

from pipeline.extract import decode_data_uri
from pipeline.presets import MODELS, SEED
from pipeline.simulator.batch import BatchService


class BoundedCounter(Counter[str]):
    """A Counter that forgets its oldest keys beyond `maxlen` (dicts keep insertion order)."""

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        self.maxlen = maxlen

    def __setitem__(self, key: str, value: int) -> None:
        if key not in self and len(self) >= self.maxlen:
            del self[next(iter(self))]
        super().__setitem__(key, value)


@dataclass
class SimConfig:
    key: str = "sim-key"
    latency_s: float = 0.0  # mean generation latency
    jitter_s: float = 0.0  # uniform +- around the mean
    seed: int = 0
    rate_429: float = 0.0  # rate limited, no Retry-After
    rate_429_retry_after: float = 0.0  # rate limited with a `Retry-After` header
    retry_after_s: float = 1.0
    rate_500: float = 0.0  # 500/502/503 with an HTML body
    rate_reset: float = 0.0  # connection dropped before any reply
    rate_refusal: float = 0.0  # finish_reason content_filter, no image
    rate_truncate: float = 0.0  # image body cut short on the image host
    rate_image_error: float = 0.0  # the image host answers 503
    rate_corrupt: float = 0.0  # the image host sends bytes that do not decode
    image_bytes: bytes | None = None  # serve these bytes for every image (hostile-image tests)
    reply_content: str | None = None  # answer every generation with this content (hostile replies)
    rate_error200: float = 0.0  # HTTP 200 whose body is an `error` object (mid-stream when streaming)
    rate_no_image: float = 0.0  # text only, no image
    rate_expired: float = 0.0  # an image URL that has already expired (the host answers 403)
    rate_hang: float = 0.0  # answer only after `hang_s`
    hang_s: float = 30.0
    refuse_words: tuple[str, ...] = ()  # prompts containing one of these are always refused
    quota_exhausted: bool = False  # every request: 429 insufficient_quota
    echo_auth: bool = False  # 400 errors quote the Authorization header back, as careless gateways do
    storm: tuple[float, float] | None = None  # every request 429s in this window (s after the first)
    max_in_flight: int = 0  # a hidden cap: 429 (no Retry-After) while more requests than this are in flight
    quota: int = 0  # at most this many requests per sliding `quota_window_s`; 429 with Retry-After/RetryInfo
    quota_window_s: float = 60.0
    rate_limit_headers: bool = False  # x-ratelimit-remaining-requests / -reset-requests on chat replies
    shape: str = (
        "markdown"  # markdown | markdown_data | bare_data | images | parts_base64 | native | redirect
    )
    ignore_aspect_ratio: bool = False  # like relays that always return 1024x1024
    url_ttl_s: float = 3600.0
    image_scale: int = 1  # divide image sizes by this (benchmarks: small images)
    distinct_images: int = 0  # 0: a picture per token; N: only N pictures, drawn once (benchmarks)
    window: int = 100_000  # per-prompt counters and request times kept: a long session stays bounded
    batch_duration_s: float = 0.2  # a batch job: pending for half of this, running for the other half
    batch_end_states: tuple[str, ...] = ()  # how the 1st, 2nd, ... job created ends (default SUCCEEDED)
    batch_lose_creates: int = 0  # the first N creates make the job, then drop the connection unanswered
    batch_page_size: int = 10  # batches listed per page
    batch_rate_429: float = 0.0  # results lines that are a 429 error
    batch_rate_500: float = 0.0  # results lines that are a 500 error


@dataclass
class SimStats:
    requests: int = 0  # chat-completions requests received
    generations: int = 0  # replies that carried an image (the billed ones)
    statuses: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)  # faults injected, by name
    in_flight: int = 0
    peak_in_flight: int = 0
    image_requests: int = 0
    downloads: int = 0  # complete image bodies served
    image_auth_headers: int = 0  # requests to the image host that carried Authorization
    key_in_url: int = 0  # native requests that carried the key as ?key= (the client never should)
    window: int = 100_000
    first_request_at: float | None = None  # time.monotonic() of the first request
    # The newest `window` of each (a long `pipeline simulate` session stays bounded):
    prompts: Counter[str] = field(init=False)  # generations per prompt
    request_times: deque[float] = field(init=False)
    reference_images: deque[str] = field(init=False)  # sha256 of each input image received
    pings: deque[str] = field(init=False)  # healthcheck pings received, by path

    def __post_init__(self) -> None:
        self.prompts = BoundedCounter(self.window)
        self.request_times = deque(maxlen=self.window)
        self.reference_images = deque(maxlen=self.window)
        self.pings = deque(maxlen=self.window)


class Simulator:
    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats(window=self.config.window)
        self._secret = random.randbytes(16)
        self._asked: Counter[str] = BoundedCounter(self.config.window)  # requests per prompt and ratio
        self._fetched: Counter[str] = BoundedCounter(self.config.window)  # downloads per image
        self._window: deque[float] = deque()  # times of the requests let through, for `quota`
        self.batch = BatchService(lambda: self.config, self._batch_answer)
        self._runners: list[web.AppRunner] = []
        self.base_url = ""  # the OpenAI-compatible gateway: {origin}/v1
        self.origin = ""  # Google's native API: {origin}/v1beta/models/...
        self.image_origin = ""
        self.cdn_origin = ""

    async def start(self, host: str = "127.0.0.1", api_port: int = 0, image_port: int = 0) -> None:
        image_app = web.Application()
        image_app.router.add_get("/img/{w:\\d+}x{h:\\d+}/{token:[0-9a-f]+}.png", self._image)
        image_app.router.add_get("/r/img/{tail:.+}", self._redirect)
        self.image_origin, self.cdn_origin = await self._serve(image_app, host, image_port, 0)
        api_app = web.Application(client_max_size=64 * 1024 * 1024)
        api_app.router.add_post("/v1/chat/completions", self._chat)
        for version in ("v1beta", "v1"):  # SDK 3.x says v1, Google's docs and SDK 2.x v1beta
            api_app.router.add_post(f"/{version}/models/{{call}}", self._native)
        self.batch.add_routes(api_app)
        api_app.router.add_get("/_sim/stats", self._stats)
        api_app.router.add_get("/hc/{check:.*}", self._healthcheck)
        [self.origin] = await self._serve(api_app, host, api_port)
        self.base_url = self.origin + "/v1"

    async def _serve(self, app: web.Application, host: str, *ports: int) -> list[str]:
        """Serve `app` on each port (0: any free one); the origins, in order."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        for port in ports:
            await web.TCPSite(runner, host, port).start()
        self._runners.append(runner)
        return [f"http://{host}:{address[1]}" for address in runner.addresses]

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.batch.close()

    def reset(self, config: SimConfig) -> None:
        """A fresh start for the next test: new knobs, zeroed counters and fault sequences."""
        self.config = config
        self.stats = SimStats(window=config.window)
        self._asked = BoundedCounter(config.window)
        self._fetched = BoundedCounter(config.window)
        self._window.clear()
        self.batch.reset()

    # The gateway: both protocols, one generation logic

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, OpenAIWire())

    async def _native(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if method == "batchGenerateContent":
            return await self.batch.create(request, model)
        if method != "generateContent":
            return _google_error(404, "NOT_FOUND", f"method {method!r} is not served here")
        return await self._counted(request, NativeWire(model))

    async def _counted(self, request: web.Request, wire: Wire) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.request_times.append(time.monotonic())
        if stats.first_request_at is None:
            stats.first_request_at = stats.request_times[-1]
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            response = await self._answer(request, wire)
        finally:
            stats.in_flight -= 1
        stats.statuses[response.status] += 1
        return response

    async def _answer(self, request: web.Request, wire: Wire) -> web.StreamResponse:
        c = self.config
        if "key" in request.query:
            self.stats.key_in_url += 1
        if not wire.authorized(request, c.key):
            return wire.unauthorized(request)
        if c.max_in_flight and self.stats.in_flight > c.max_in_flight:
            self.stats.faults["over_cap"] += 1
            return wire.throttled(None)
        if c.quota_exhausted:
            return wire.quota_exhausted()
        wait, rate_headers = self._quota()
        if wait is not None:
            self.stats.faults["over_quota"] += 1
            return wire.throttled(wait)
        try:
            body = await request.json()
            asked = wire.parse(body)
        except ValueError as exc:
            echo = f" (sent with {request.headers.get('Authorization')})" if c.echo_auth else ""
            return wire.bad_request(f"{exc}{echo}")
        prompt, ratio, inputs = asked.prompt, asked.aspect_ratio, asked.inputs
        nth = self._asked[f"{prompt}\x1f{ratio}"]
        self._asked[f"{prompt}\x1f{ratio}"] += 1
        rng = random.Random(f"{c.seed}\x1f{prompt}\x1f{ratio}\x1f{nth}")
        fault = "429" if self._in_storm() else self._draw_fault(rng)
        self.stats.faults[fault or "none"] += 1
        if fault == "reset":
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=499)
        if fault in ("429", "429ra"):
            return wire.throttled(c.retry_after_s if fault == "429ra" else None)
        await asyncio.sleep(c.hang_s if fault == "hang" else self._latency(rng))
        if fault == "500" or (fault == "error200" and isinstance(wire, NativeWire)):
            return wire.server_error(rng.choice((500, 502, 503)))
        stream = body.get("stream") is True
        if fault == "error200":
            error = {"error": {"message": "upstream error (request id: sim-200)", "type": "upstream_error"}}
            return await _send(request, [error], stream)
        blocked = any(w in prompt for w in c.refuse_words)
        if fault == "refusal" or blocked:
            return await wire.refused(request, stream, prompt_blocked=blocked)
        if fault == "no_image":
            return await wire.no_image(request, stream)
        self.stats.generations += 1
        self.stats.prompts[prompt] += 1
        token = hashlib.sha256(f"{prompt}\x1f{nth}".encode()).hexdigest()[:16]
        expires = time.time() - 1 if fault == "expired" else None
        self.stats.reference_images.extend(hashlib.sha256(data).hexdigest() for data in inputs)
        size = (
            self._size(ratio, asked.model, asked.image_size)
            if ratio or not inputs
            else _image_size(inputs[0])
        )
        if isinstance(wire, NativeWire):
            return web.json_response(_native_image(asked.model, c.image_bytes or render_png(*size, token)))
        response = await _send(request, self._image_reply(size, token, expires), stream)
        response.headers.update(rate_headers)
        return response

    def _batch_answer(self, model: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
        """One line of a batch job's results: the same generation as online, without the wire."""
        c = self.config
        try:
            asked = _parse_native(model, body)
        except ValueError as exc:
            return {"key": key, "error": {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}}
        prompt, ratio = asked.prompt, asked.aspect_ratio
        nth = self._asked[f"{prompt}\x1f{ratio}"]
        self._asked[f"{prompt}\x1f{ratio}"] += 1
        roll = random.Random(f"{c.seed}\x1fbatch\x1f{prompt}\x1f{ratio}\x1f{nth}").random()
        if roll < c.batch_rate_429:
            return {
                "key": key,
                "error": {"code": 429, "message": "Resource exhausted.", "status": "RESOURCE_EXHAUSTED"},
            }
        if roll < c.batch_rate_429 + c.batch_rate_500:
            return {"key": key, "error": {"code": 500, "message": "Internal error.", "status": "INTERNAL"}}
        if any(w in prompt for w in c.refuse_words):
            return {"key": key, "response": {"promptFeedback": {"blockReason": "SAFETY"}}}
        self.stats.generations += 1
        self.stats.prompts[prompt] += 1
        token = hashlib.sha256(f"{prompt}\x1f{nth}".encode()).hexdigest()[:16]
        size = (
            self._size(ratio, model, asked.image_size)
            if ratio or not asked.inputs
            else _image_size(asked.inputs[0])
        )
        return {"key": key, "response": _native_image(model, c.image_bytes or render_png(*size, token))}

    def _quota(self) -> tuple[float | None, dict[str, str]]:
        """Under a per-window quota: (None, rate-limit headers) for a request let through, or (seconds
        until the window has room, {}) for one refused."""
        c = self.config
        if not c.quota:
            return None, {}
        now = time.monotonic()
        while self._window and self._window[0] <= now - c.quota_window_s:
            self._window.popleft()
        if len(self._window) >= c.quota:
            return round(self._window[0] + c.quota_window_s - now, 3), {}
        self._window.append(now)
        if not c.rate_limit_headers:
            return None, {}
        reset = self._window[0] + c.quota_window_s - now
        return None, {
            "x-ratelimit-limit-requests": str(c.quota),
            "x-ratelimit-remaining-requests": str(c.quota - len(self._window)),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }

    async def _healthcheck(self, request: web.Request) -> web.Response:
        self.stats.pings.append(request.match_info["check"])
        return web.Response(text="OK")

    def _in_storm(self) -> bool:
        storm = self.config.storm
        if storm is None:
            return False
        elapsed = time.monotonic() - (self.stats.first_request_at or 0.0)
        return storm[0] <= elapsed < storm[1]

    def _draw_fault(self, rng: random.Random) -> str | None:
        c = self.config
        roll = rng.random()
        for name, rate in (
            ("reset", c.rate_reset), ("429", c.rate_429), ("429ra", c.rate_429_retry_after),
            ("500", c.rate_500), ("refusal", c.rate_refusal), ("error200", c.rate_error200),
            ("no_image", c.rate_no_image), ("expired", c.rate_expired), ("hang", c.rate_hang),
        ):  # fmt: skip
            if roll < rate:
                return name
            roll -= rate
        return None

    def _image_reply(self, size: tuple[int, int], token: str, expires: float | None) -> list[dict[str, Any]]:
        """The chunks of a successful reply in the configured shape (one chunk unless streaming)."""
        width, height = size
        shape = self.config.shape
        if shape in ("markdown", "images", "redirect"):
            url = self.image_url(size, token, expires)
        else:
            url = "data:image/png;base64," + base64.b64encode(render_png(width, height, token)).decode()
        raw = url.partition(",")[2]
        if shape == "native":
            part = {"inlineData": {"mimeType": "image/png", "data": raw}}
            return [{"candidates": [{"content": {"parts": [part]}, "finishReason": "STOP"}]}]
        if shape == "images":
            message: dict[str, Any] = {
                "content": "",
                "images": [{"type": "image_url", "image_url": {"url": url}}],
            }
        elif shape == "parts_base64":
            message = {
                "content": [
                    {"type": "text", "text": "Here."},
                    {"type": "image_url", "image_url": {"url": raw}},
                ]
            }
        elif shape == "bare_data":
            message = {"content": f"Here you go {url} enjoy"}
        else:  # markdown and redirect: a URL; markdown_data: a data URI
            message = {"content": self.config.reply_content or f"Here is your image: ![image]({url})"}
        heartbeat = _completion("", "stop", delta=True)
        halves = _split_message(message)
        return [heartbeat, *(_completion(m, None, delta=True) for m in halves)]

    def _latency(self, rng: random.Random) -> float:
        c = self.config
        return max(0.0, c.latency_s + rng.uniform(-c.jitter_s, c.jitter_s))

    async def _stats(self, request: web.Request) -> web.Response:
        s = self.stats
        return web.json_response(
            {
                "requests": s.requests,
                "generations": s.generations,
                "downloads": s.downloads,
                "peak_in_flight": s.peak_in_flight,
                "image_requests": s.image_requests,
                "image_auth_headers": s.image_auth_headers,
                "statuses": {str(k): v for k, v in s.statuses.items()},
            }
        )

    # The image host

    def image_url(self, size: str | tuple[int, int], token: str, expires: float | None = None) -> str:
        """A signed URL on the image host, for an aspect ratio or a size; in `redirect` shape it
        answers 302 to another origin."""
        width, height = self._size(size) if isinstance(size, str) else size
        path = f"/img/{width}x{height}/{token}.png"
        exp = int(expires if expires is not None else time.time() + self.config.url_ttl_s)
        signature = quote(self._sign(path, exp), safe="")
        via = "/r" if self.config.shape == "redirect" else ""
        return f"{self.image_origin}{via}{path}?Expires={exp}&Signature={signature}"

    def _size(
        self, ratio: str | None, model: str = "gemini-2.5-flash-image", image_size: str | None = None
    ) -> tuple[int, int]:
        spec = MODELS[model]
        ratio = "1:1" if self.config.ignore_aspect_ratio or not ratio else ratio
        width, height = spec.size(ratio, image_size if image_size in spec.sizes else None) or (1024, 1024)
        return width // self.config.image_scale, height // self.config.image_scale

    async def _redirect(self, request: web.Request) -> web.Response:
        self._count_image_request(request)
        raise web.HTTPFound(f"{self.cdn_origin}{request.path_qs.removeprefix('/r')}")

    def _count_image_request(self, request: web.Request) -> None:
        self.stats.image_requests += 1
        if "Authorization" in request.headers:
            self.stats.image_auth_headers += 1

    def _sign(self, path: str, expires: int) -> str:
        mac = hmac.new(self._secret, f"{path}:{expires}".encode(), hashlib.sha256).digest()
        return base64.b64encode(mac).decode()

    async def _image(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        self._count_image_request(request)
        try:
            expires = int(request.query.get("Expires", ""))
        except ValueError:
            return web.Response(status=403, text="AccessDenied")
        signature = request.query.get("Signature", "")
        if not hmac.compare_digest(signature, self._sign(request.path, expires)):
            return web.Response(status=403, text="SignatureDoesNotMatch")
        if time.time() > expires:
            return web.Response(status=403, text="Request has expired")
        width, height = int(request.match_info["w"]), int(request.match_info["h"])
        token = request.match_info["token"]
        picture = f"{int(token, 16) % c.distinct_images:x}" if (c := self.config).distinct_images else token
        png = c.image_bytes or render_png(width, height, picture)
        nth = self._fetched[token]
        self._fetched[token] += 1
        roll = random.Random(f"{c.seed}\x1f{token}\x1f{nth}").random()
        if roll < c.rate_truncate:
            stats.faults["truncated"] += 1
            return await _truncated(request, png)
        if roll < c.rate_truncate + c.rate_image_error:
            stats.faults["image_503"] += 1
            return web.Response(status=503, text="<html>Service Unavailable</html>", content_type="text/html")
        if roll < c.rate_truncate + c.rate_image_error + c.rate_corrupt:
            stats.faults["corrupt"] += 1
            return web.Response(body=png[: len(png) // 3] + b"garbage" * 50, content_type="image/png")
        stats.downloads += 1
        return web.Response(body=png, content_type="image/png")


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
    "contents", "generationConfig", "generation_config", "safetySettings", "safety_settings",
    "systemInstruction", "system_instruction", "tools", "toolConfig", "tool_config", "cachedContent",
}  # fmt: skip


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
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
             "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
        ]  # fmt: skip
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
        "id": f"gemini-{now}", "object": "chat.completion.chunk" if delta else "chat.completion",
        "created": now, "model": "gemini-2.5-flash-image",
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "delta" if delta else "message": {"role": "assistant", **body}}],
    }  # fmt: skip


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


@lru_cache(maxsize=256)
def render_png(width: int, height: int, token: str) -> bytes:
    """A picture unique to `token`: a coloured background with a few shapes."""
    rng = random.Random(token)
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(1, width // 2 + 2), y0 + rng.randrange(1, height // 2 + 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue()


class SimulatorThread:
    """The simulator on its own event loop in a background thread (tests, benchmarks)."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.sim = Simulator(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Simulator:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.sim.start(), self._loop).result(10)
        return self.sim

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        await self.sim.stop()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
