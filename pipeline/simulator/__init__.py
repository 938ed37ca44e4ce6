"""The providers' stand-in: an OpenAI-compatible gateway and Google's native API on one loopback
port (with the Files and Batch endpoints, `batch`), and an image host on two more.

It follows the provider contracts: it checks the key and the body like a gateway or Google would
(400 on a bad aspect ratio, camelCase keys refused by the gateway), answers with a markdown image link
to a signed, expiring URL on the other origin (or inline base64, natively), and serves real PNGs of
the model's exact size whose pictures differ per prompt. Each protocol's bodies and errors are in
`wire`. Knobs add a hidden in-flight cap, a sliding quota and rate-limit headers. Latency and
faults are knobs too; each fault is drawn from a generator seeded with the prompt and how many times
it was asked, so a run's faults do not depend on request order. The demo, the tests and the
benchmark all use it; `stats` counts what it saw.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import random
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from aiohttp import web
from PIL import Image, ImageDraw

from pipeline.catalog import shipped
from pipeline.simulator.batch import BatchService
from pipeline.simulator.openai_batch import OpenAIBatchService
from pipeline.simulator.wire import (
    ImagesWire,
    NativeWire,
    OpenAIWire,
    Wire,
    _Asked,
    _completion,
    _google_error,
    _image_size,
    _native_image,
    _parse_images,
    _parse_native,
    _send,
    _split_message,
    _truncated,
    images_reply,
)


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
    outage_s: float = 0.0  # every generation answers 503 "no available channel" for this long after the first
    # A fixed reply for each prompt that contains a word: (word, status, headers, body). Status 0 drops
    # the connection; a body is sent as it is (HTML pages, JSON errors).
    replies: tuple[tuple[str, int, tuple[tuple[str, str], ...], str], ...] = ()
    max_in_flight: int = 0  # a hidden cap: 429 (no Retry-After) while more requests than this are in flight
    quota: int = 0  # at most this many requests per sliding `quota_window_s`; 429 with Retry-After/RetryInfo
    quota_window_s: float = 60.0
    rate_limit_headers: bool = False  # x-ratelimit-remaining-requests / -reset-requests on chat replies
    shape: str = (
        "markdown"  # markdown | markdown_data | bare_data | images | parts_base64 | native | redirect
    )
    ignore_aspect_ratio: bool = False  # like relays that always return 1024x1024
    served_model: str | None = None  # replies say this model made the image (a relay that re-routes)
    retired_models: tuple[str, ...] = ()  # asked for one of these: the protocol's "no such model" answer
    flex_shed_rate: float = 0.0  # flex requests shed for capacity (503, or 429 RESOURCE_EXHAUSTED)
    flex_latency_s: float = 0.0  # added to a flex request's latency (flex answers in minutes)
    flex_served_tier: str | None = None  # a flex reply says this tier served it (default: flex)
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
    batch_polls_fail: bool = False  # every get of a job answers 503 (the batch API is down)


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
    log: deque[tuple[float, str, int]] = field(init=False)  # (received at, prompt, status) of each request
    # The newest `window` of each (a long `pipeline simulate` session stays bounded):
    prompts: Counter[str] = field(init=False)  # generations per prompt
    request_times: deque[float] = field(init=False)
    reference_images: deque[str] = field(init=False)  # sha256 of each input image received
    pings: deque[str] = field(init=False)  # healthcheck pings received, by path

    def __post_init__(self) -> None:
        self.prompts = BoundedCounter(self.window)
        self.log = deque(maxlen=self.window)
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
        self.openai_batch = OpenAIBatchService(lambda: self.config, self._images_batch_answer)
        self.batch = BatchService(lambda: self.config, self._batch_answer, self.openai_batch)
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
        api_app.router.add_post("/v1/images/generations", self._images)
        api_app.router.add_post("/v1/images/edits", self._edits)
        for version in ("v1beta", "v1"):  # SDK 3.x says v1, Google's docs and SDK 2.x v1beta
            api_app.router.add_post(f"/{version}/models/{{call}}", self._native)
        self.batch.add_routes(api_app)
        self.openai_batch.add_routes(api_app)
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
        self.openai_batch.close()

    def reset(self, config: SimConfig) -> None:
        """A fresh start for the next test: new knobs, zeroed counters and fault sequences."""
        self.config = config
        self.stats = SimStats(window=config.window)
        self._asked = BoundedCounter(config.window)
        self._fetched = BoundedCounter(config.window)
        self._window.clear()
        self.batch.reset()
        self.openai_batch.reset()

    # The gateway: both protocols, one generation logic

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, OpenAIWire())

    async def _images(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, ImagesWire())

    async def _edits(self, request: web.Request) -> web.StreamResponse:
        wire = ImagesWire()
        wire.edit = True
        return await self._counted(request, wire)

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
        prompt: list[str] = []  # the prompt, once read
        try:
            response = await self._answer(request, wire, prompt)
        finally:
            stats.in_flight -= 1
        stats.statuses[response.status] += 1
        stats.log.append((stats.request_times[-1], "".join(prompt), response.status))
        return response

    async def _answer(self, request: web.Request, wire: Wire, said: list[str]) -> web.StreamResponse:
        c = self.config
        if "key" in request.query:
            self.stats.key_in_url += 1
        if not wire.authorized(request, c.key):
            return wire.unauthorized(request)
        refused, rate_headers = self._over_limits(wire)
        if refused is not None:
            return refused
        try:
            asked, stream = await wire.read(request)
        except ValueError as exc:
            echo = f" (sent with {request.headers.get('Authorization')})" if c.echo_auth else ""
            return wire.bad_request(f"{exc}{echo}")
        prompt, ratio = asked.prompt, asked.aspect_ratio
        said.append(prompt)
        staged = self._staged(request, prompt) or self._retired(wire, asked.model) or self._shed(asked)
        if staged is not None:
            return staged
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
        if fault == "error200":
            error = {"error": {"message": "upstream error (request id: sim-200)", "type": "upstream_error"}}
            return await _send(request, [error], stream)
        blocked = any(w in prompt for w in c.refuse_words)
        if fault == "refusal" or blocked:
            return await wire.refused(request, stream, prompt_blocked=blocked)
        if fault == "no_image":
            return await wire.no_image(request, stream)
        expires = time.time() - 1 if fault == "expired" else None
        response = await self._generated(request, wire, asked, nth, expires, stream)
        response.headers.update(rate_headers)
        return response

    async def _generated(
        self, request: web.Request, wire: Wire, asked: _Asked, nth: int, expires: float | None, stream: bool
    ) -> web.StreamResponse:
        """A successful generation, counted, in the protocol's shape."""
        c, prompt, inputs = self.config, asked.prompt, asked.inputs
        self.stats.generations += 1
        self.stats.prompts[prompt] += 1
        token = hashlib.sha256(f"{prompt}\x1f{nth}".encode()).hexdigest()[:16]
        self.stats.reference_images.extend(hashlib.sha256(data).hexdigest() for data in inputs)
        size = (
            self._size(asked.aspect_ratio, asked.model, asked.image_size, asked.pixels)
            if asked.aspect_ratio or not inputs
            else _image_size(inputs[0])
        )
        served = c.served_model or asked.model
        if isinstance(wire, ImagesWire):
            return web.json_response(images_reply(c.image_bytes or render_png(*size, token), served))
        if isinstance(wire, NativeWire):
            flex = asked.service_tier == "flex"
            if flex:
                await asyncio.sleep(c.flex_latency_s)
            tier = (c.flex_served_tier or "flex") if flex else None
            return web.json_response(_native_image(served, c.image_bytes or render_png(*size, token), tier))
        chunks = self._image_reply(size, token, expires)
        for chunk in chunks:
            chunk["model"] = served
        return await _send(request, chunks, stream)

    def _over_limits(self, wire: Wire) -> tuple[web.Response | None, dict[str, str]]:
        """A refusal for a request over the hidden cap or the quota (or with no quota left); else
        the rate-limit headers of one let through."""
        c = self.config
        if c.max_in_flight and self.stats.in_flight > c.max_in_flight:
            self.stats.faults["over_cap"] += 1
            return wire.throttled(None), {}
        if c.quota_exhausted:
            return wire.quota_exhausted(), {}
        wait, rate_headers = self._quota()
        if wait is not None:
            self.stats.faults["over_quota"] += 1
            return wire.throttled(wait), {}
        return None, rate_headers

    def _shed(self, asked: _Asked) -> web.Response | None:
        """A flex request shed for capacity, drawn per prompt and try like the other faults."""
        c = self.config
        if asked.service_tier != "flex":
            return None
        self.stats.faults["flex_requests"] += 1
        if not c.flex_shed_rate:
            return None
        nth = self._asked[f"flex\x1f{asked.prompt}"]
        self._asked[f"flex\x1f{asked.prompt}"] += 1
        roll = random.Random(f"{c.seed}\x1fflex\x1f{asked.prompt}\x1f{nth}").random()
        if roll >= c.flex_shed_rate:
            return None
        self.stats.faults["shed"] += 1
        if roll < c.flex_shed_rate / 2:
            return _google_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        return _google_error(429, "RESOURCE_EXHAUSTED", "Flex capacity is exhausted. Please try again later.")

    def _retired(self, wire: Wire, model: str) -> web.Response | None:
        """A model shut down: Google's 404, or a relay's deprecation notice (OpenAI's code)."""
        if model not in self.config.retired_models:
            return None
        self.stats.faults["retired"] += 1
        return wire.retired(model)

    def _staged(self, request: web.Request, prompt: str) -> web.StreamResponse | None:
        """A failure the test staged: an outage window, or a scripted reply."""
        c = self.config
        first = self.stats.first_request_at
        if c.outage_s and first is not None and time.monotonic() - first < c.outage_s:
            self.stats.faults["outage"] += 1
            return web.json_response(
                {"error": {"message": "no available channel", "type": "new_api_error"}}, status=503
            )
        for word, status, headers, body in c.replies:
            if word in prompt:
                self.stats.faults[f"scripted_{status}"] += 1
                if status == 0:
                    assert request.transport is not None
                    request.transport.close()
                    return web.Response(status=499)
                return web.Response(status=status, headers=dict(headers), text=body)
        return None

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
        png = c.image_bytes or render_png(*size, token)
        return {"key": key, "response": _native_image(c.served_model or model, png)}

    def _images_batch_answer(self, custom_id: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """One line of an OpenAI batch's results: the same generation as online, without the wire;
        True when it belongs in the error file."""
        c = self.config

        def line(status: int, reply: dict[str, Any]) -> dict[str, Any]:
            response = {"status_code": status, "request_id": f"req_{custom_id}", "body": reply}
            ident = f"batch_req_{secrets.token_hex(8)}"
            return {"id": ident, "custom_id": custom_id, "response": response, "error": None}

        def error(status: int, message: str, kind: str, code: str | None) -> tuple[dict[str, Any], bool]:
            return line(
                status, {"error": {"message": message, "type": kind, "param": None, "code": code}}
            ), True

        try:
            asked = _parse_images(body, [])
        except ValueError as exc:
            return error(400, str(exc), "invalid_request_error", None)
        prompt = asked.prompt
        nth = self._asked[f"{prompt}\x1f{asked.aspect_ratio}"]
        self._asked[f"{prompt}\x1f{asked.aspect_ratio}"] += 1
        roll = random.Random(f"{c.seed}\x1fbatch\x1f{prompt}\x1f{nth}").random()
        if roll < c.batch_rate_429:
            return error(429, "Rate limit reached for images per minute", "requests", "rate_limit_exceeded")
        if roll < c.batch_rate_429 + c.batch_rate_500:
            return error(500, "The server had an error processing your request.", "server_error", None)
        if any(w in prompt for w in c.refuse_words):
            return error(
                400, "rejected by the safety system", "image_generation_user_error", "moderation_blocked"
            )
        self.stats.generations += 1
        self.stats.prompts[prompt] += 1
        token = hashlib.sha256(f"{prompt}\x1f{nth}".encode()).hexdigest()[:16]
        size = self._size(asked.aspect_ratio, asked.model, None, asked.pixels)
        png = c.image_bytes or render_png(*size, token)
        return line(200, images_reply(png, c.served_model or asked.model)), False

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
            ("reset", c.rate_reset),
            ("429", c.rate_429),
            ("429ra", c.rate_429_retry_after),
            ("500", c.rate_500),
            ("refusal", c.rate_refusal),
            ("error200", c.rate_error200),
            ("no_image", c.rate_no_image),
            ("expired", c.rate_expired),
            ("hang", c.rate_hang),
        ):
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
        self,
        ratio: str | None,
        model: str = "gemini-2.5-flash-image",
        image_size: str | None = None,
        pixels: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        spec = shipped().find(model)
        ratio = "1:1" if self.config.ignore_aspect_ratio or not ratio else ratio
        pixels = None if self.config.ignore_aspect_ratio else pixels
        width, height = pixels or (spec.pixels(ratio, image_size) if spec else (1024, 1024))
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
