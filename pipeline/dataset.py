"""The dataset files, rewritten from the state store at the end of every run so they always match it.

`metadata.jsonl` is the Hugging Face `imagefolder` convention: one row per image, `file_name`
relative to the output folder. `failures.jsonl` lists the items failed now.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.download import fsync_path
from pipeline.state import State


def write_dataset(state: State, output: Path) -> None:
    _write_lines(output / "metadata.jsonl", state.images())
    _write_lines(output / "failures.jsonl", (json.dumps(f, ensure_ascii=False) for f in state.failures()))


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")
    fsync_path(tmp)
    tmp.replace(path)
