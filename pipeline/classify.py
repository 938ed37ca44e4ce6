"""Turn one reply of the chat-completions endpoint into exactly one outcome. Pure functions.

The outcome is either the list of image references found, or the `ItemError` that says what went wrong
and whether to retry, stop the item, or stop the whole run (provider contract, section 2). An error's
`type`/`code` decides first, the HTTP status second, its message text never.
"""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from pipeline.errors import (
    FatalError,
    ItemError,
    NoImageError,
    PermanentError,
    RefusalError,
    RetryableError,
)
from pipeline.extract import extract_images

REFUSAL_REASONS = {
    "content_filter",
    "safety",
    "image_safety",
    "prohibited_content",
    "image_prohibited_content",
    "blocklist",
    "spii",
    "recitation",
    "image_recitation",
    "prompt_blocked",
}
FATAL_CODES = {
    "insufficient_quota",
    "insufficient_user_quota",
    "invalid_api_key",
    "authentication_error",
    "permission_denied",
    "unauthenticated",
    "account_deactivated",
    "billing_not_active",
}
PERMANENT_CODES = {"convert_request_failed", "invalid_argument", "model_not_found", "not_found"}
RETRYABLE_CODES = {
    "rate_limit_exceeded",
    "resource_exhausted",
    "unavailable",
    "internal",
    "server_error",
    "deadline_exceeded",
    "overloaded",
    "upstream_error",
    "timeout",
}
# Texts some relays send instead of an image when the prompt was blocked (gemini-balance: "no reply yet").
REFUSAL_PLACEHOLDERS = {"暂无返回"}
# A Google status quoted inside a relay's message: `400 INVALID_ARGUMENT`, `"status": "NOT_FOUND"`.
INNER_STATUS = re.compile(
    r"""\b[45]\d\d\.? ([A-Z][A-Z_]{3,})\b|["']status["']\s*:\s*["']([A-Z][A-Z_]{3,})["']"""
)
MAX_MESSAGE = 500
# A 429 that names a daily limit (OpenRouter's `free-models-per-day`, Google's `...PerDay...` quota ids,
# "RPD"): nothing will get through before tomorrow.
DAILY_LIMIT = re.compile(r"per[-_ ]?day|daily|\bRPD\b", re.IGNORECASE)
# A model the provider no longer serves: Google's 404 for a shut-down id, OpenAI's `model_not_found`,
# a relay's "model ... has been deprecated / withdrawn".
RETIRED = re.compile(
    r"model_not_found|is not found for api version|not supported for generatecontent|model\b.{0,80}\b"
    r"(deprecated|withdrawn|retired|decommissioned|shut ?down|no longer (available|supported))",
    re.IGNORECASE,
)
DAILY_RESET_S = 15 * 60.0  # no requests left and the window resets later than this (or is past): a cap
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def classify(
    status: int, headers: dict[str, str], body: bytes, now: datetime | None = None
) -> list[str] | ItemError:
    """Images found, or the error this reply amounts to."""
    text = body.decode("utf-8", "replace").strip()
    return classify_data(status, headers, parse_json(text), text, now)


def classify_data(
    status: int, headers: dict[str, str], data: Any, text: str = "", now: datetime | None = None
) -> list[str] | ItemError:
    """As `classify`, for a body already parsed (`data` is None when it was not JSON)."""
    now = now or datetime.now(UTC)
    retry_after = parse_retry_after(headers.get("retry-after"), now)
    error = _error_object(data)
    if error is not None:
        outcome = retired(_from_error(status, error, retry_after), str(error))
        return daily_cap(outcome, {**headers, **_quoted_headers(error)}, str(error), now)
    if status >= 300 or data is None:
        outcome = retired(_from_status(status, describe_body(status, text), retry_after), text)
        return daily_cap(outcome, headers, text, now)
    images = extract_images(data)
    return images or no_image(data)


def daily_cap(outcome: ItemError, headers: dict[str, str], text: str, now: datetime) -> ItemError:
    """A 429 that is a daily cap becomes a quota error (the provider is done for the run); any other
    outcome is returned as it is. A cap: the reply names a daily limit, or says no request is left
    with the window's reset more than 15 minutes away or already past."""
    if outcome.kind != "rate_limited":
        return outcome
    remaining = headers.get("x-ratelimit-remaining", "").strip()
    reset = parse_reset(headers.get("x-ratelimit-reset"), now)
    spent = remaining == "0" and reset is not None and (reset > DAILY_RESET_S or reset <= 0)
    if DAILY_LIMIT.search(text) or spent:
        return FatalError(f"daily limit reached: {outcome.message}", kind="quota")
    return outcome


def retired(outcome: ItemError, text: str) -> ItemError:
    """A refusal to serve the model itself (retired, unknown here) becomes fatal for the provider;
    any other outcome is returned as it is."""
    if outcome.retryable or isinstance(outcome, RefusalError) or not RETIRED.search(text):
        return outcome
    return FatalError(outcome.message, kind="model_retired")


def parse_reset(value: str | None, now: datetime) -> float | None:
    """`X-RateLimit-Reset` as seconds from now (negative: already past): a Unix time in milliseconds
    (OpenRouter) or seconds, or seconds to wait."""
    try:
        number = float(value or "")
    except ValueError:
        return None
    if number > 1e11:
        number /= 1000.0
    return number - now.timestamp() if number > 1e9 else number


def _quoted_headers(error: dict[str, Any]) -> dict[str, str]:
    """Rate-limit headers a relay quotes inside the error (OpenRouter's `metadata.headers`)."""
    metadata = error.get("metadata")
    quoted = metadata.get("headers") if isinstance(metadata, dict) else None
    return {str(k).lower(): str(v) for k, v in quoted.items()} if isinstance(quoted, dict) else {}


def reply_field(body: bytes, name: str) -> str | None:
    """A string field of a reply (`model`, `modelVersion`, `serviceTier`) read from its first or last
    4 KB, without parsing megabytes of base64 again."""
    pattern = re.compile(rb'"' + re.escape(name.encode()) + rb'"\s*:\s*"([^"\\]{1,200})"')
    for part in (body[:4096], body[-4096:]):
        found = pattern.search(part)
        if found:
            return found.group(1).decode("utf-8", "replace")
    return None


def reply_number(body: bytes, name: str) -> int | None:
    """A whole-number field of a reply (`candidatesTokenCount`), read from its last 4 KB."""
    found = re.search(rb'"' + re.escape(name.encode()) + rb'"\s*:\s*(\d{1,12})\b', body[-4096:])
    return int(found.group(1)) if found else None


def parse_json(text: str) -> Any:
    if not text.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _error_object(data: Any) -> dict[str, Any] | None:
    """The `error` of a body, on any status, also inside a JSON array; None when there is none."""
    for item in data if isinstance(data, list) else [data]:
        if isinstance(item, dict) and item.get("error"):
            error = item["error"]
            return error if isinstance(error, dict) else {"message": str(error)}
    return None


def _from_error(status: int, error: dict[str, Any], retry_after: float | None) -> ItemError:
    codes = {str(error.get(k)).lower() for k in ("type", "code", "status") if error.get(k)}
    message = _message(error)
    codes |= {(a or b).lower() for a, b in INNER_STATUS.findall(str(error.get("message") or ""))}
    if 400 <= status < 500 and status not in (408, 429):
        codes -= RETRYABLE_CODES  # the HTTP status wins over an outer label: a 4xx is no server error
    delay = retry_after if retry_after is not None else gemini_retry_delay(error)
    if codes & FATAL_CODES:
        return FatalError(message)
    if codes & REFUSAL_REASONS:
        return RefusalError(message)
    if codes & PERMANENT_CODES:
        return PermanentError(message)
    if codes & RETRYABLE_CODES:
        return RetryableError(message, retry_after=delay, kind=_retry_kind(status))
    numeric = error.get("code") if isinstance(error.get("code"), int) else None
    effective = status if status >= 400 else numeric or 503
    return _from_status(effective, message, delay)


def _from_status(status: int, message: str, retry_after: float | None) -> ItemError:
    if status in (401, 403):
        return FatalError(message)
    if status in (408, 429) or status >= 500 or status < 300:
        return RetryableError(message, retry_after=retry_after, kind=_retry_kind(status))
    return PermanentError(message)


def _retry_kind(status: int) -> str:
    return {429: "rate_limited", 408: "timeout"}.get(status, "server_error")


def _message(error: dict[str, Any]) -> str:
    parts = [str(error.get("message") or "").strip()]
    for key in ("type", "code"):
        if error.get(key) not in (None, ""):
            parts.append(f"{key}={error[key]}")
    text = " ".join(p for p in parts if p) or "error with no message"
    return clip(text)


def describe_body(status: int, text: str) -> str:
    if not text:
        return f"HTTP {status} with an empty body"
    if text.startswith("<") or "<html" in text[:200].lower():
        title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
        return clip(f"HTTP {status} HTML page" + (f": {title.group(1)}" if title else ""))
    return clip(f"HTTP {status}: {text}")


def clip(text: str) -> str:
    """One line, bounded, without control characters (no terminal escapes from a provider), keeping
    any `(request id: ...)` even when the rest is cut."""
    text = " ".join(CONTROL.sub(" ", text).split())
    if len(text) <= MAX_MESSAGE:
        return text
    request_id = re.search(r"\(request id: [^)]*\)", text)
    return text[: MAX_MESSAGE - 60] + "..." + (f" {request_id.group(0)}" if request_id else "")


def no_image(data: Any) -> ItemError:
    reasons = finish_reasons(data)
    refused = [r for r in reasons if r.lower() in REFUSAL_REASONS]
    if refused:
        return RefusalError(f"refused by the provider: {refused[0]}")
    said = " ".join(_texts(data))[:200]
    if said.strip() in REFUSAL_PLACEHOLDERS:
        return RefusalError(f"refused by the provider (placeholder reply {said.strip()!r})")
    detail = f" (finish_reason {', '.join(reasons)})" if reasons else ""
    return NoImageError(clip(f"reply has no image{detail}" + (f": {said}" if said else "")))


def finish_reasons(data: Any) -> list[str]:
    """Every finish or block reason in a reply: OpenAI choices and native Gemini fields alike."""
    if not isinstance(data, dict):
        return []
    found = [c.get("finish_reason") for c in _dicts(data.get("choices"))]
    found += [c.get("finishReason") or c.get("finish_reason") for c in _dicts(data.get("candidates"))]
    feedback = data.get("promptFeedback") or data.get("prompt_feedback")
    if isinstance(feedback, dict):
        found.append(feedback.get("blockReason") or feedback.get("block_reason"))
    return [str(r) for r in found if r]


def _texts(data: Any) -> list[str]:
    texts = []
    for choice in _dicts(data.get("choices") if isinstance(data, dict) else None):
        message = choice.get("message") or choice.get("delta") or {}
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            texts.append(message["content"])
    return texts


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds to wait: either delta-seconds or an HTTP date."""
    seconds = parse_duration(value)
    if seconds is not None or not value:
        return seconds
    try:
        return max(0.0, (parsedate_to_datetime(value.strip()) - now).total_seconds())
    except (TypeError, ValueError):
        return None


def gemini_retry_delay(error: dict[str, Any]) -> float | None:
    """A Gemini `RetryInfo.retryDelay` ("34s") inside the error's details, in seconds."""
    for detail in _dicts(error.get("details")):
        delay = detail.get("retryDelay") or detail.get("retry_delay")
        if isinstance(delay, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", delay)
            if match:
                return float(match.group(1))
    return None


def backoff_delay(attempt: int, rng: random.Random, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


def rate_headers(headers: dict[str, str]) -> tuple[int | None, float | None]:
    """OpenAI-style `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests` ("1s", "6m0s",
    "20ms"): requests left in the window and seconds until it resets; None where absent or unreadable."""
    remaining_text = headers.get("x-ratelimit-remaining-requests", "").strip()
    remaining = int(remaining_text) if remaining_text.isdigit() else None
    return remaining, parse_duration(headers.get("x-ratelimit-reset-requests"))


def parse_duration(value: str | None) -> float | None:
    """A Go-style duration (`1m30.5s`, `20ms`, `2h`) or plain seconds, in seconds."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * units[unit] for number, unit in parts)
