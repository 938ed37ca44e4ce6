"""Server-sent events folded into one reply, as the provider contract describes. No I/O."""

from __future__ import annotations

import base64
import json

from pipeline.classify import classify_data
from pipeline.errors import RefusalError, RetryableError
from pipeline.sse import assemble_stream


def sse(*chunks: object, done: bool = True, comment: bool = True) -> bytes:
    lines = [": OPENROUTER PROCESSING", ""] if comment else []
    for chunk in chunks:
        lines += [f"data: {json.dumps(chunk)}", ""]
    if done:
        lines += ["data: [DONE]", ""]
    return "\n".join(lines).encode()


def delta(content: object = None, finish: str | None = None, **extra: object) -> dict:
    body = {"content": content, **extra} if content is not None or extra else {}
    return {"choices": [{"index": 0, "delta": body, "finish_reason": finish}]}


URL = "https://cdn.example/a.png?Expires=1&Signature=x%2By"
USAGE_ONLY = {"choices": [], "usage": {"total_tokens": 3}}


def images(body: bytes) -> list[str] | object:
    reply, _ = assemble_stream(body)
    return classify_data(200, {}, reply)


def test_markdown_split_across_deltas_is_joined_before_scanning() -> None:
    body = sse(delta("Here ![ima"), delta(f"ge]({URL[:20]}"), delta(f"{URL[20:]}) done"), USAGE_ONLY)
    assert images(body) == [URL]


def test_heartbeat_finish_reason_before_the_content_is_not_the_end() -> None:
    body = sse(delta("", "stop"), delta(f"![i]({URL})"))
    assert images(body) == [URL]


def test_multi_megabyte_single_line() -> None:
    payload = base64.b64encode(b"\x89PNG" + b"\0" * 3_000_000).decode()
    body = sse(delta(f"![i](data:image/png;base64,{payload})"))
    [found] = images(body)  # type: ignore[misc]
    assert len(found) > 4_000_000


def test_images_delta_and_list_typed_delta() -> None:
    body = sse(
        delta("", images=[{"type": "image_url", "image_url": {"url": URL}}]),
        delta([{"type": "image_url", "image_url": {"url": "https://h/2.png"}}]),
    )
    assert images(body) == [URL, "https://h/2.png"]


def test_error_mid_stream() -> None:
    body = sse(delta("working..."), {"error": {"message": "upstream died", "code": 503}}, done=False)
    assert isinstance(images(body), RetryableError)


def test_refusal_in_stream() -> None:
    assert isinstance(images(sse(delta("", "content_filter"))), RefusalError)


def test_done_is_reported_and_end_of_stream_without_done_still_reads_content() -> None:
    assert assemble_stream(sse(delta("x")))[1] is True
    reply, done = assemble_stream(sse(delta(f"![i]({URL})"), done=False))
    assert done is False and classify_data(200, {}, reply) == [URL]


def test_garbage_lines_are_skipped() -> None:
    body = b"event: ping\n\ndata: {not json\n\n" + sse(delta(f"![i]({URL})"), comment=False)
    assert images(body) == [URL]
