"""Server-sent events (`stream: true`) folded back into one chat-completions reply. Pure.

Per the provider contract: join every `delta.content` before scanning it (one delta can be a
multi-megabyte base64 line), keep `delta.images` and list-typed deltas, skip `:` comment lines and
usage-only chunks with `choices: []`, read to `[DONE]` or the end of the stream (a `finish_reason`
heartbeat can come before the content), and surface an `error` chunk as the reply's error.
"""

from __future__ import annotations

import json
from typing import Any


def assemble_stream(body: bytes) -> tuple[dict[str, Any], bool]:
    """(the reply as one non-streaming body, whether `[DONE]` was seen)."""
    texts: dict[int, list[str]] = {}
    parts: dict[int, list[Any]] = {}
    finish: dict[int, str] = {}
    for payload in _data_lines(body):
        if payload == "[DONE]":
            return _reply(texts, parts, finish), True
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if isinstance(chunk, dict) and chunk.get("error"):
            return {"error": chunk["error"]}, True
        for choice in chunk.get("choices") or [] if isinstance(chunk, dict) else []:
            _fold(choice, texts, parts, finish)
    return _reply(texts, parts, finish), False


def _data_lines(body: bytes) -> list[str]:
    events = []
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("data:"):
            events.append(line[5:].strip())
    return events


def _fold(
    choice: Any, texts: dict[int, list[str]], parts: dict[int, list[Any]], finish: dict[int, str]
) -> None:
    if not isinstance(choice, dict):
        return
    index: int = choice["index"] if isinstance(choice.get("index"), int) else 0
    delta = choice.get("delta") or choice.get("message") or {}
    if isinstance(delta, dict):
        content = delta.get("content")
        if isinstance(content, str):
            texts.setdefault(index, []).append(content)
        elif isinstance(content, list):
            parts.setdefault(index, []).extend(content)
        for key in ("images", "image"):
            if isinstance(delta.get(key), list):
                parts.setdefault(index, []).extend(delta[key])
    if choice.get("finish_reason"):
        finish[index] = str(choice["finish_reason"])


def _reply(
    texts: dict[int, list[str]], parts: dict[int, list[Any]], finish: dict[int, str]
) -> dict[str, Any]:
    choices = []
    for index in sorted(set(texts) | set(parts) | set(finish)):
        content = [{"type": "text", "text": "".join(texts.get(index, []))}, *parts.get(index, [])]
        choices.append({"index": index, "finish_reason": finish.get(index), "message": {"content": content}})
    return {"choices": choices}
