"""Export an output folder as WebDataset tar shards: `<key>.<ext>` + `<key>.json` per sample.

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


def export_webdataset(output: Path, destination: Path, shard_size: int) -> list[Path]:
    """Write shards of at most `shard_size` samples; the shard paths, in order."""
    destination.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    with State(output / "state.db", readonly=True) as state:
        samples = enumerate(json.loads(line) for line in state.images())
        while batch := list(itertools.islice(samples, shard_size)):
            final = destination / f"shard-{len(shards):06d}.tar"
            tmp = final.with_name(f".{final.name}.tmp")
            with tarfile.open(tmp, "w") as archive:
                for n, row in batch:
                    _add_sample(archive, output, n, row)
            tmp.replace(final)
            shards.append(final)
    return shards


def _add_sample(archive: tarfile.TarFile, output: Path, n: int, row: dict[str, Any]) -> None:
    image = Path(row["file_name"])
    key = f"{n:09d}-{image.stem.replace('.', '_')}"
    archive.add(output / image, arcname=f"{key}{image.suffix}")
    data = json.dumps(row, ensure_ascii=False).encode()
    info = tarfile.TarInfo(f"{key}.json")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))
