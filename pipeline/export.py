"""Export an output as WebDataset tar shards: `<key>.<ext>` + `<key>.json` per sample.

Keys carry no dot (WebDataset splits a member name at its first dot): the sample's position and
its name with dots replaced. Shards are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any

from pipeline.state import State
from pipeline.storage import Store


def export_webdataset(store: Store, state: State, target: Store, prefix: str, shard_size: int) -> list[str]:
    """Write shards of at most `shard_size` samples of `store` into `target` (under `prefix`); the
    shard names, in order. Each shard is complete before it is put in place."""
    shards: list[str] = []
    target.prepare()
    with state:
        samples = enumerate(json.loads(line) for line in state.images())
        try:
            while batch := list(itertools.islice(samples, shard_size)):
                name = f"shard-{len(shards):06d}.tar"
                tmp = target.spool / f".{name}.tmp"
                with tarfile.open(tmp, "w") as archive:
                    for n, row in batch:
                        _add_sample(archive, store, n, row)
                target.put(tmp, f"{prefix}{name}", replace=True)
                shards.append(f"{target.url}/{prefix}{name}")
        finally:
            target.close()
    return shards


def _add_sample(archive: tarfile.TarFile, store: Store, n: int, row: dict[str, Any]) -> None:
    image = Path(row["file_name"])
    key = f"{n:09d}-{image.stem.replace('.', '_')}"
    with store.open(row["file_name"]) as source:
        _add_bytes(archive, f"{key}{image.suffix}", source.read())
    _add_bytes(archive, f"{key}.json", json.dumps(row, ensure_ascii=False).encode())


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))
