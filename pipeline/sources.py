"""Prompt files (`prompts_file:` jobs): .txt, .csv or .jsonl, read lazily, one row at a time.

A row is validated on its own (prompt, id, aspect_ratio, count), so a streaming pass can report every
problem with its file and line before the first request, in memory that does not grow with the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.presets import ASPECT_RATIOS, ID_RE, ID_RULE


@dataclass(frozen=True, slots=True)
class SourceRow:
    line: int
    prompt: str
    id: str | None
    aspect_ratio: str | None
    count: int | None


def read_rows(path: Path, id_field: str | None, prompt_field: str) -> Iterator[SourceRow | str]:
    """Each row of a prompts file, or a string saying what is wrong with it (`line N: ...`)."""
    for line, raw in _raw_rows(path, prompt_field):
        if isinstance(raw, str):
            yield f"line {line}: {raw}"
            continue
        row = _row(line, raw, id_field, prompt_field)
        yield row if isinstance(row, SourceRow) else f"line {line}: {row}"


def _raw_rows(path: Path, prompt_field: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        if path.suffix == ".csv":
            reader = csv.DictReader(handle)
            for record in reader:
                yield reader.line_num, {k: v for k, v in record.items() if v not in (None, "")}
        elif path.suffix == ".jsonl":
            for line, text in enumerate(handle, 1):
                if text.strip():
                    yield line, _json_object(text)
        else:
            for line, text in enumerate(handle, 1):
                prompt = text.strip()
                if prompt and not prompt.startswith("#"):
                    yield line, {prompt_field: prompt}


def _json_object(text: str) -> dict[str, Any] | str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})"
    return value if isinstance(value, dict) else "must be a JSON object"


def _row(line: int, raw: dict[str, Any], id_field: str | None, prompt_field: str) -> SourceRow | str:
    prompt = raw.get(prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return f"{prompt_field}: must be a non-empty string"
    if len(prompt) > 32_000:
        return f"{prompt_field}: longer than 32000 characters"
    ident = raw.get(id_field) if id_field else None
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    if ident is not None and not (isinstance(ident, str) and ID_RE.fullmatch(ident)):
        return f"{id_field}: {ident!r} {ID_RULE}"
    ratio = raw.get("aspect_ratio")
    if ratio is not None and ratio not in ASPECT_RATIOS:
        return f"aspect_ratio: {ratio!r} is not one of {', '.join(ASPECT_RATIOS)}"
    count = raw.get("count")
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        return f"count: must be a whole number of at least 1, got {count!r}"
    return SourceRow(line, prompt, ident, ratio, count)
