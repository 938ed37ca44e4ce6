"""The dataset files, rewritten from the state store at the end of every run so they always match it.

`metadata.jsonl` is the Hugging Face `imagefolder` convention: one row per image, `file_name`
relative to the output. `failures.jsonl` lists the items failed now. With many workers, each
rewrites them as it ends, one at a time, from the state as it is then: the last one writes the
newest.
"""

from __future__ import annotations

import json

from pipeline.state import State
from pipeline.storage import Store


def write_dataset(state: State, store: Store) -> None:
    with state.exclusive():
        store.write_lines("metadata.jsonl", state.images())
        store.write_lines("failures.jsonl", (json.dumps(f, ensure_ascii=False) for f in state.failures()))
