"""The retry policy and the daily-cap rule, as pure functions: tables, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.classify import classify, parse_reset
from pipeline.errors import (
    DownloadError,
    FatalError,
    ItemError,
    NoImageError,
    PermanentError,
    RefusalError,
    RetryableError,
    UrlGoneError,
)
from pipeline.providers.gemini import classify_gemini
from pipeline.retry import (
    SAME_ERROR_STOP,
    THROTTLES_PER_ATTEMPT,
    Action,
    Decision,
    Verdict,
    for_item,
    for_provider,
)

THROTTLED = RetryableError("slow down", kind="rate_limited")
WAIT_20 = RetryableError("busy", retry_after=20.0, kind="server_error")
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("error", "attempts", "throttles", "expected"),
    [
        (FatalError("bad key"), 0, 0, Decision(Action.STOP, costs_attempt=False)),
        (FatalError("quota", kind="quota"), 3, 0, Decision(Action.STOP, costs_attempt=False)),
        (THROTTLED, 0, 0, Decision(Action.RETRY, 0.0, costs_attempt=False)),
        (THROTTLED, 1, THROTTLES_PER_ATTEMPT * 2 - 1, Decision(Action.RETRY, 0.0, costs_attempt=False)),
        (THROTTLED, 0, THROTTLES_PER_ATTEMPT * 2, Decision(Action.RETRY, 0.0)),  # bound reached: costs
        (THROTTLED, 1, THROTTLES_PER_ATTEMPT * 2, Decision(Action.GIVE_UP)),
        (WAIT_20, 0, 0, Decision(Action.RETRY, 20.0)),  # the server's Retry-After, exactly
        (RetryableError("reset", kind="network"), 0, 0, Decision(Action.RETRY, None)),  # backoff
        (RetryableError("reset", kind="network"), 1, 0, Decision(Action.GIVE_UP)),  # max_attempts 2
        (DownloadError("truncated"), 0, 0, Decision(Action.RETRY, None)),
        (UrlGoneError("expired"), 0, 0, Decision(Action.RETRY, None)),  # only a new generation helps
        (NoImageError("text only"), 0, 0, Decision(Action.RETRY, None)),  # once more
        (NoImageError("text only"), 1, 0, Decision(Action.GIVE_UP)),
        (RefusalError("safety"), 0, 0, Decision(Action.GIVE_UP)),
        (PermanentError("bad ratio"), 0, 0, Decision(Action.GIVE_UP)),
        (PermanentError("too big", kind="too_large"), 0, 0, Decision(Action.GIVE_UP)),
    ],
)
def test_for_item(error: ItemError, attempts: int, throttles: int, expected: Decision) -> None:
    assert for_item(error, attempts, throttles, max_attempts=2) == expected


@pytest.mark.parametrize(
    ("error", "same", "expected"),
    [
        (FatalError("bad key"), 0, Verdict.DISABLE),
        (THROTTLED, 0, Verdict.THROTTLED),
        (RetryableError("502 page", kind="server_error"), 0, Verdict.FAILING),
        (RetryableError("timed out", kind="timeout"), 0, Verdict.FAILING),
        (RetryableError("reset", kind="network"), 5, Verdict.FAILING),
        (PermanentError("Invalid model"), 0, Verdict.SUSPECT),
        (PermanentError("Invalid model"), SAME_ERROR_STOP - 2, Verdict.SUSPECT),
        (PermanentError("Invalid model"), SAME_ERROR_STOP - 1, Verdict.DISABLE),
        (RefusalError("safety"), 20, Verdict.ANSWERED),
        (NoImageError("text only"), 0, Verdict.ANSWERED),
        (PermanentError("too big", kind="too_large"), 0, Verdict.ANSWERED),  # not the plain 400
    ],
)
def test_for_provider(error: ItemError, same: int, expected: Verdict) -> None:
    assert for_provider(error, same) is expected


OPENROUTER_DAILY = (
    b'{"error": {"message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free'
    b' model requests per day", "code": 429, "metadata": {"headers": {"X-RateLimit-Limit": "50",'
    b' "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1796428800000"}}}}'
)
GOOGLE_PER_DAY = (
    b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "You exceeded your current quota",'
    b' "details": [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId":'
    b' "GenerateRequestsPerDayPerProjectPerModel", "quotaValue": "250"}]}, {"@type":'
    b' "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}]}}'
)
GOOGLE_PER_MINUTE = GOOGLE_PER_DAY.replace(b"PerDay", b"PerMinute")
RESET_SOON = str(int(NOW.timestamp() * 1000) + 60_000)
RESET_TOMORROW = str(int(NOW.timestamp()) + 20 * 3600)
RESET_PAST = str(int(NOW.timestamp() * 1000) - 5_000)


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind"),
    [
        (429, {}, OPENROUTER_DAILY, "quota"),  # names the daily limit, and quotes spent headers
        (429, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": RESET_TOMORROW}, b"slow down", "quota"),
        (429, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": RESET_PAST}, b"slow down", "quota"),
        (429, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": RESET_SOON}, b"slow down", "rate_limited"),
        (429, {"x-ratelimit-remaining": "3", "x-ratelimit-reset": RESET_TOMORROW}, b"busy", "rate_limited"),
        (429, {}, b'{"error": {"message": "RPD limit reached", "type": "rate_limit"}}', "quota"),
        (429, {}, b'{"error": {"message": "daily request limit", "code": "rate_limit_exceeded"}}', "quota"),
        (429, {"retry-after": "20"}, b'{"error": {"message": "too many requests"}}', "rate_limited"),
        (503, {}, b'{"error": {"message": "daily maintenance"}}', "server_error"),  # a 5xx is no cap
    ],
)
def test_a_daily_cap_is_a_quota(status: int, headers: dict[str, str], body: bytes, kind: str) -> None:
    outcome = classify(status, headers, body, NOW)
    assert isinstance(outcome, ItemError) and outcome.kind == kind
    assert isinstance(outcome, FatalError) == (kind == "quota")


def test_google_per_day_quota_is_a_quota_even_with_retry_info() -> None:
    daily = classify_gemini(429, {}, GOOGLE_PER_DAY, NOW)
    minute = classify_gemini(429, {}, GOOGLE_PER_MINUTE, NOW)
    assert isinstance(daily, FatalError) and daily.kind == "quota"
    assert isinstance(minute, RetryableError) and minute.retry_after == 34.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1796428800000", 1796428800 - NOW.timestamp()),  # Unix milliseconds (OpenRouter)
        ("1796428800", 1796428800 - NOW.timestamp()),  # Unix seconds
        ("30", 30.0),  # seconds to wait
        ("soon", None),
        (None, None),
    ],
)
def test_parse_reset(value: str | None, seconds: float | None) -> None:
    assert parse_reset(value, NOW) == seconds
