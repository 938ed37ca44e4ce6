"""Classification: every reply and error body of the provider contract -> one outcome. No I/O."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest

from pipeline.classify import backoff_delay, classify, parse_retry_after
from pipeline.errors import (
    FatalError,
    NoImageError,
    PermanentError,
    RefusalError,
    RetryableError,
)

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
URL = "https://cdn.example/a.png?Expires=1&Signature=x%2By"


def body(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def reply(content: object, finish: str = "stop", **message: object) -> bytes:
    return body({"choices": [{"finish_reason": finish, "message": {"content": content, **message}}]})


def err(type_: str | None = None, code: object = None, message: str = "boom") -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


IMAGES = "images"
CASES = {
    # Images found
    "markdown URL": (200, {}, reply(f"![i]({URL})"), IMAGES),
    "images[] with empty content": (200, {}, reply("", images=[{"image_url": {"url": URL}}]), IMAGES),
    # Refusals
    "finish_reason content_filter": (200, {}, reply("no", "content_filter"), RefusalError),
    "raw Gemini SAFETY": (200, {}, reply(None, "SAFETY"), RefusalError),
    "raw Gemini image_safety lower case": (200, {}, reply(None, "image_safety"), RefusalError),
    "PROHIBITED_CONTENT": (200, {}, reply(None, "PROHIBITED_CONTENT"), RefusalError),
    "IMAGE_RECITATION": (200, {}, reply(None, "IMAGE_RECITATION"), RefusalError),
    "native promptFeedback.blockReason": (
        200,
        {},
        body({"promptFeedback": {"blockReason": "BLOCKLIST"}}),
        RefusalError,
    ),
    "prompt_blocked error code": (
        400,
        {},
        body(err("invalid_request_error", "prompt_blocked")),
        RefusalError,
    ),
    "gemini-balance blocked: 200, stop, placeholder text": (200, {}, reply("暂无返回", "stop"), RefusalError),
    # No image (worth one retry)
    "plain text only": (200, {}, reply("Here is a description of a kitten."), NoImageError),
    "content null": (200, {}, reply(None), NoImageError),
    "choices empty": (200, {}, body({"choices": []}), NoImageError),
    "NO_IMAGE finish": (200, {}, reply(None, "NO_IMAGE"), NoImageError),
    "OTHER finish": (200, {}, reply("", "OTHER"), NoImageError),
    "400 wrapping Google's INVALID_ARGUMENT in an outer INTERNAL": (
        400,
        {},
        body(
            {
                "error": {
                    "code": 500,
                    "status": "INTERNAL",
                    "message": '400 INVALID_ARGUMENT. {"error": {"code": 400, '
                    '"message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}}',
                }
            }
        ),
        PermanentError,
    ),
    "400 labelled internal_error, nothing inside": (400, {}, body(err("internal", None)), PermanentError),
    "500 labelled INTERNAL stays retryable": (
        500,
        {},
        body({"error": {"code": 500, "status": "INTERNAL", "message": "x"}}),
        RetryableError,
    ),
    # Errors in disguise on HTTP 200
    "200 with error object, no code": (200, {}, body(err("upstream_error", None)), RetryableError),
    "200 with error carrying code 429": (
        200,
        {},
        body({"error": {"code": 429, "message": "busy"}}),
        RetryableError,
    ),
    "200 with error array": (200, {}, body([{"error": {"code": 401, "message": "bad key"}}]), FatalError),
    "200 with error string": (200, {}, body({"error": "something broke"}), RetryableError),
    "200 HTML page": (200, {}, b"<html><title>Gateway</title></html>", RetryableError),
    "200 empty body": (200, {}, b"", RetryableError),
    # Fatal for the run
    "401": (401, {}, body(err("invalid_request_error", "invalid_api_key")), FatalError),
    "403 HTML": (403, {}, b"<html>forbidden</html>", FatalError),
    "insufficient_quota as 429": (429, {}, body(err("insufficient_quota", "insufficient_quota")), FatalError),
    "insufficient_user_quota on 403": (
        403,
        {},
        body(err("new_api_error", "insufficient_user_quota")),
        FatalError,
    ),
    # Permanent for the item
    "400 bad request": (400, {}, body(err("invalid_request_error", None)), PermanentError),
    "404": (404, {}, body(err(None, None)), PermanentError),
    "422": (422, {}, b"unprocessable", PermanentError),
    "500 convert_request_failed": (
        500,
        {},
        body(err("new_api_error", "convert_request_failed")),
        PermanentError,
    ),
    # Retryable
    "429 no Retry-After": (429, {}, body(err("rate_limit_error", None, "上游负载已饱和")), RetryableError),
    "429 Chinese text same as quota": (429, {}, body(err(None, None, "上游负载已饱和")), RetryableError),
    "408": (408, {}, b"", RetryableError),
    "500 JSON": (500, {}, body(err("server_error", None)), RetryableError),
    "502 HTML": (502, {}, b"<html><head><title>502 Bad Gateway</title></head></html>", RetryableError),
    "503 empty": (503, {}, b"", RetryableError),
    "504 text": (504, {}, b"upstream timed out", RetryableError),
    "Gemini RESOURCE_EXHAUSTED": (
        429,
        {},
        body({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota per minute"}}),
        RetryableError,
    ),
}


@pytest.mark.parametrize(("status", "headers", "raw", "expected"), CASES.values(), ids=CASES.keys())
def test_classify(status: int, headers: dict, raw: bytes, expected: object) -> None:
    outcome = classify(status, headers, raw, NOW)
    if expected == IMAGES:
        assert outcome == [URL]
    else:
        assert type(outcome) is expected, outcome


def test_refusal_from_code_is_not_retryable() -> None:
    outcome = classify(400, {}, body(err(None, "prompt_blocked")), NOW)
    assert isinstance(outcome, RefusalError) and not outcome.retryable and outcome.kind == "refusal"


def test_retry_after_seconds_and_date() -> None:
    seconds = classify(429, {"retry-after": "7"}, body(err("rate_limit_error")), NOW)
    assert isinstance(seconds, RetryableError) and seconds.retry_after == 7
    date = classify(503, {"retry-after": "Thu, 01 Jan 2026 12:00:30 GMT"}, b"", NOW)
    assert isinstance(date, RetryableError) and date.retry_after == 30


def test_gemini_retry_delay_used_when_no_header() -> None:
    error = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "slow down",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}],
        }
    }
    outcome = classify(429, {}, body(error), NOW)
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 34


def test_retry_after_header_beats_gemini_delay() -> None:
    error = {"error": {"code": 429, "message": "x", "details": [{"retryDelay": "34s"}]}}
    outcome = classify(429, {"retry-after": "2"}, body(error), NOW)
    assert isinstance(outcome, RetryableError) and outcome.retry_after == 2


def test_request_id_survives_a_long_message() -> None:
    message = "x" * 2000 + " (request id: 2025abc123)"
    outcome = classify(500, {}, body(err("server_error", None, message)), NOW)
    assert isinstance(outcome, RetryableError)
    assert "(request id: 2025abc123)" in outcome.message and len(outcome.message) < 600


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        ("0.5", 0.5),
        ("-1", 0.0),
        ("Thu, 01 Jan 2026 11:59:00 GMT", 0.0),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_backoff_is_jittered_exponential_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        delays = [backoff_delay(attempt, rng, base=1, cap=60) for _ in range(200)]
        assert all(0 <= d <= min(60, 2**attempt) for d in delays)
        assert max(delays) > 0.5 * min(60, 2**attempt)  # full jitter spans the range


def test_provider_text_is_one_clean_line() -> None:
    hostile = "bad\x1b[2J\x1b[31m key\r\nFAKE LOG LINE\x07 (request id: r1)"
    outcome = classify(500, {}, body(err("server_error", None, hostile)), NOW)
    assert isinstance(outcome, RetryableError)
    assert outcome.message == "bad [2J [31m key FAKE LOG LINE (request id: r1) type=server_error"
