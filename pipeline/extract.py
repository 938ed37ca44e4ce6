"""Find every image in a chat-completions reply (provider contract, section 2). Pure functions.

An image reference is a string: an http(s) URL to download, or a `data:` URI with the bytes inline.
Raw base64 without a `data:` prefix becomes a `data:` URI; anything else is passed on as found and
refused later by the downloader, which accepts only http(s) and data.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

_IN_TEXT = re.compile(
    r'!\[[^\]]*\]\(\s*<?(?P<md>[^)>]+?)>?(?:\s+"[^"]*")?\s*\)'
    r"|(?P<bare>data:image/[\w.+-]+;base64,[A-Za-z0-9+/=_-]+)"
)
_RAW_BASE64 = re.compile(r"^[A-Za-z0-9+/=_\-\s]{64,}$")


def extract_images(reply: Any) -> list[str]:
    """Every image reference in a reply, in order, identical strings once."""
    found: list[str] = []
    if isinstance(reply, dict):
        for choice in _list(reply.get("choices")):
            if isinstance(choice, dict):
                found += _from_message(choice.get("message") or choice.get("delta"))
        for candidate in _list(reply.get("candidates")):
            if isinstance(candidate, dict):
                found += _from_native_parts(_get(candidate, "content", "parts"))
    return list(dict.fromkeys(found))


def _from_message(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    found = _from_content(message.get("content"))
    for image in _list(message.get("images")) + _list(message.get("image")):
        found += _from_part(image)
    return found


def _from_content(content: Any) -> list[str]:
    if isinstance(content, str):
        return images_in_text(content)
    found: list[str] = []
    for part in _list(content):
        found += _from_part(part)
    return found


def _from_part(part: Any) -> list[str]:
    """A content part, an `images[]` entry or an `image[]` entry, in any of the shapes relays use."""
    if isinstance(part, str):
        return [_as_reference(part)]
    if not isinstance(part, dict):
        return []
    if part.get("type") == "text" or "text" in part:
        return images_in_text(str(part.get("text") or ""))
    image_url = part.get("image_url")
    if isinstance(image_url, dict):
        image_url = image_url.get("url")
    mime = part.get("mime_type") or part.get("mimeType")
    for value in (image_url, part.get("url")):
        if isinstance(value, str) and value.strip():
            return [_as_reference(value, mime)]
    for value in (part.get("b64_json"), part.get("data")):
        if isinstance(value, str) and value.strip():
            return [_as_reference(value, mime, inline=True)]
    return _from_native_parts([part])


def _from_native_parts(parts: Any) -> list[str]:
    found: list[str] = []
    for part in _list(parts):
        if not isinstance(part, dict):
            continue
        inline = part.get("inlineData") or part.get("inline_data")
        if isinstance(inline, dict) and isinstance(inline.get("data"), str):
            mime = inline.get("mimeType") or inline.get("mime_type")
            found.append(_as_reference(inline["data"], mime, inline=True))
        elif isinstance(part.get("text"), str):
            found += images_in_text(part["text"])
    return found


def images_in_text(text: str) -> list[str]:
    """Markdown images `![...](URL or data URI)` and bare `data:image/...;base64,...` runs."""
    if "](" not in text and "data:" not in text:
        return []
    found = []
    for match in _IN_TEXT.finditer(text):
        ref = match.group("md") or match.group("bare")
        found.append(re.sub(r"\s+", "", ref) if ref.startswith("data:") else ref)
    return found


def _as_reference(value: str, mime: Any = None, *, inline: bool = False) -> str:
    """A URL or data URI as is; raw base64 (known inline, or long and base64-shaped) as a data URI."""
    value = value.strip()
    if value.startswith(("http://", "https://", "data:")):
        return value
    if not inline and not _RAW_BASE64.match(value[:4096]):
        return value
    return f"data:{mime if isinstance(mime, str) else 'image/*'};base64,{value}"


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a base64 `data:` URI, read leniently: whitespace, URL-safe alphabet, no padding."""
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise ValueError("not a base64 data: URI")
    try:  # the common case, strict base64 as sent, without a copy per leniency (a line is 2 MB)
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        pass
    payload = re.sub(r"\s+", "", payload).rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in data: URI ({exc})") from None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value
