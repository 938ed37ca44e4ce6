"""Google's native protocol: the request body and every reply of the contract -> one outcome. No I/O."""

from __future__ import annotations

import base64
import json

import pytest

from pipeline.errors import FatalError, NoImageError, PermanentError, RefusalError, RetryableError
from pipeline.item import Item
from pipeline.providers.gemini import classify_gemini, request_body

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 64).decode()


def body(value: object) -> bytes:
    return json.dumps(value).encode()


def candidate(parts: list[dict[str, object]] | None = None, finish: str = "STOP", **extra: object) -> bytes:
    content = {"role": "model", "parts": parts} if parts is not None else {}
    return body({"candidates": [{"content": content, "finishReason": finish, "index": 0, **extra}]})


def google_error(code: int, status: str, message: str = "x", details: list[object] | None = None) -> bytes:
    error: dict[str, object] = {"code": code, "status": status, "message": message}
    if details is not None:
        error["details"] = details
    return body({"error": error})


RETRY = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}
QUOTA = {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaValue": "500"}]}
BAD_KEY = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
IMAGE = {"inlineData": {"mimeType": "image/png", "data": PNG}}
CASES = {
    "image part": (200, candidate([IMAGE]), "image"),
    "text part first, then the image": (200, candidate([{"text": "Here is your image: "}, IMAGE]), "image"),
    "snake_case inline_data": (
        200,
        candidate([{"inline_data": {"mime_type": "image/png", "data": PNG}}]),
        "image",
    ),
    "NO_IMAGE without content": (200, candidate(None, "NO_IMAGE"), NoImageError),
    "IMAGE_OTHER": (200, candidate(None, "IMAGE_OTHER"), NoImageError),
    "OTHER": (200, candidate(None, "OTHER"), NoImageError),
    "STOP with text only": (200, candidate([{"text": "I cannot draw that."}]), NoImageError),
    "IMAGE_SAFETY with a finishMessage": (
        200,
        candidate(None, "IMAGE_SAFETY", finishMessage="unsafe"),
        RefusalError,
    ),
    "PROHIBITED_CONTENT": (200, candidate(None, "PROHIBITED_CONTENT"), RefusalError),
    "SPII": (200, candidate(None, "SPII"), RefusalError),
    "IMAGE_RECITATION": (200, candidate(None, "IMAGE_RECITATION"), RefusalError),
    "promptFeedback.blockReason OTHER": (
        200,
        body({"promptFeedback": {"blockReason": "OTHER"}}),
        RefusalError,
    ),
    "400 INVALID_ARGUMENT": (
        400,
        google_error(400, "INVALID_ARGUMENT", "Aspect ratio 1:4 is not supported"),
        PermanentError,
    ),
    "400 API_KEY_INVALID": (
        400,
        google_error(400, "INVALID_ARGUMENT", "API key not valid", [BAD_KEY]),
        FatalError,
    ),
    "400 FAILED_PRECONDITION": (
        400,
        google_error(400, "FAILED_PRECONDITION", "not in your region"),
        FatalError,
    ),
    "402 prepaid credits": (402, google_error(402, "PAYMENT_REQUIRED"), FatalError),
    "403 PERMISSION_DENIED": (403, google_error(403, "PERMISSION_DENIED"), FatalError),
    "404 model not found": (404, google_error(404, "NOT_FOUND", "models/x is not found"), FatalError),
    "429 with RetryInfo after QuotaFailure": (
        429,
        google_error(429, "RESOURCE_EXHAUSTED", "quota", [QUOTA, RETRY]),
        RetryableError,
    ),
    "429 without details: credits depleted": (
        429,
        google_error(429, "RESOURCE_EXHAUSTED", "Your prepayment credits are depleted"),
        FatalError,
    ),
    "500 INTERNAL": (500, google_error(500, "INTERNAL"), RetryableError),
    "503 UNAVAILABLE overloaded": (
        503,
        google_error(503, "UNAVAILABLE", "The model is overloaded"),
        RetryableError,
    ),
    "504 DEADLINE_EXCEEDED": (504, google_error(504, "DEADLINE_EXCEEDED"), RetryableError),
    "502 HTML page": (502, b"<html><title>502</title></html>", RetryableError),
    "empty 200": (200, b"", RetryableError),
    "408": (408, b"", RetryableError),
}


@pytest.mark.parametrize(("status", "reply", "expected"), CASES.values(), ids=CASES.keys())
def test_classify_gemini(status: int, reply: bytes, expected: object) -> None:
    outcome = classify_gemini(status, {}, reply)
    if expected == "image":
        assert outcome == [f"data:image/png;base64,{PNG}"]
    else:
        assert type(outcome) is expected, outcome


def test_retry_delay_and_kind() -> None:
    outcome = classify_gemini(429, {}, google_error(429, "RESOURCE_EXHAUSTED", "q", [QUOTA, RETRY]))
    assert isinstance(outcome, RetryableError)
    assert (outcome.kind, outcome.retry_after) == ("rate_limited", 34.0)
    refusal = classify_gemini(200, {}, candidate(None, "IMAGE_SAFETY", finishMessage="a reason"))
    assert (
        isinstance(refusal, RefusalError)
        and "IMAGE_SAFETY" in refusal.message
        and "a reason" in refusal.message
    )


def test_request_body() -> None:
    item = Item("a", 0, "a lighthouse", "16:9", "gemini-3-pro-image-preview", "fp", (), "2K")
    assert request_body(item, [("image/png", PNG)]) == {
        "contents": [{"role": "user", "parts": [{"text": "a lighthouse"}, IMAGE]}],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "2K"},
        },
    }
    edit = Item("b", 0, "make it blue", None, "gemini-2.5-flash-image", "fp")
    assert request_body(edit)["generationConfig"] == {"responseModalities": ["IMAGE"]}
