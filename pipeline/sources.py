"""Prompt files (`prompts_file:` jobs): .txt, .csv or .jsonl, read lazily, one row at a time.

A row is validated on its own (prompt, id, aspect_ratio, count), so a streaming pass can report every
problem with its file and line before the first request, in memory that does not grow with the file.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.catalog import parse_ratio
from pipeline.ids import ID_RE, ID_RULE


@dataclass(frozen=True, slots=True)
class SourceRow:
    line: int
    prompt: str
    id: str | None
    aspect_ratio: str | None
    count: int | None


def text_encoding(head: bytes) -> str:
    """UTF-16 when a byte-order mark says so (what Windows tools save as "Unicode"), else UTF-8,
    a UTF-8 byte-order mark dropped."""
    return "utf-16" if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"


def decode_text(data: bytes) -> str:
    """A whole file's text, or ValueError saying why it is not text (with the line)."""
    encoding = text_encoding(data)
    if encoding != "utf-16" and b"\x00" in data:
        raise ValueError(_nul(data[: data.index(b"\x00")].count(b"\n") + 1))
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise ValueError(_not_text(encoding, exc, data[: exc.start].count(b"\n") + 1)) from None
    if "\x00" in text:
        raise ValueError(_nul(text[: text.index("\x00")].count("\n") + 1))
    return text


def _not_text(encoding: str, exc: UnicodeDecodeError, line: int) -> str:
    if encoding == "utf-16":
        return f"not valid UTF-16 text (near line {line})"
    return f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} on line {line} (save it as UTF-8)"


def _nul(line: int) -> str:
    return f"contains NUL bytes on line {line}: not a text file"


def read_rows(path: Path, id_field: str | None, prompt_field: str) -> Iterator[SourceRow | str]:
    """Each row of a prompts file, or a string saying what is wrong with it (`line N: ...`); a
    problem with the whole file (unreadable, not text, no prompts) ends the rows."""
    rows = 0
    try:
        for line, raw in _raw_rows(path, prompt_field):
            rows += 1
            if isinstance(raw, str):
                yield f"line {line}: {raw}"
                continue
            row = _row(line, raw, id_field, prompt_field)
            yield row if isinstance(row, SourceRow) else f"line {line}: {row}"
    except IsADirectoryError:
        yield "is a directory, not a prompts file"
    except OSError as exc:
        yield f"cannot read: {exc.strerror or exc}"
    except (ValueError, csv.Error) as exc:
        yield str(exc)
    else:
        if rows == 0:
            yield "is empty: no prompts in it"


def _raw_rows(path: Path, prompt_field: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    with path.open("rb") as binary:
        encoding = text_encoding(binary.read(2))
    lines = _lines(path, encoding)
    if path.suffix == ".csv":
        reader = csv.DictReader(line for _, line in lines)
        for record in reader:
            yield reader.line_num, {k: v for k, v in record.items() if v not in (None, "")}
    elif path.suffix == ".jsonl":
        for line, text in lines:
            if text.strip():
                yield line, _json_object(text)
    else:
        for line, text in lines:
            prompt = text.strip()
            if prompt and not prompt.startswith("#"):
                yield line, {prompt_field: prompt}


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, kept whole with its line ending (csv needs them); ValueError
    at the first line that is not text."""
    if encoding == "utf-16":
        with path.open(encoding=encoding, newline="") as handle:
            line = 0
            try:
                for line, text in enumerate(handle, 1):
                    if "\x00" in text:
                        raise ValueError(_nul(line))
                    yield line, text
            except UnicodeDecodeError as exc:
                raise ValueError(_not_text(encoding, exc, line + 1)) from None
        return
    with path.open("rb") as handle:
        for line, data in enumerate(handle, 1):
            if b"\x00" in data:
                raise ValueError(_nul(line))
            try:
                text = data.decode(encoding if line == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(_not_text(encoding, exc, line)) from None
            yield line, text


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
    if ratio is not None and (not isinstance(ratio, str) or parse_ratio(ratio) is None):
        return f'aspect_ratio: {ratio!r} is not a W:H ratio such as "16:9"'
    count = raw.get("count")
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        return f"count: must be a whole number of at least 1, got {count!r}"
    return SourceRow(line, prompt, ident, ratio, count)
