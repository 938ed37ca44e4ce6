"""Export an output as a Hub-ready dataset folder: parquet shards with the image bytes inside and a
dataset card (shared `dataset-formats.md`; the layout and metadata `huggingface/datasets` writes).

    DIR/data/train-00000-of-00003.parquet ...   shards of about `shard_size_mb`, row groups of ~100 MB
    DIR/README.md                                 the card: YAML front matter (configs, license, ...)

The `image` column is `struct<bytes: binary, path: string>` holding each file's bytes exactly as
stored (never re-encoded: provenance chunks such as C2PA survive), its `path` the metadata's
`file_name`; every other metadata field is a column. The Arrow schema metadata key `huggingface`
carries the features (`{"_type": "Image"}` for the image column), which is what makes `datasets`
and the Hub's viewer decode it as an image. Rows stream from the state: a shard is never held
whole, only its current row group. Publishing is then `hf upload REPO DIR --repo-type dataset`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.state import State
from pipeline.storage import Store

ROW_GROUP_BYTES = 100_000_000  # as `datasets` writes them
COLUMNS: dict[str, pa.DataType] = {  # the metadata columns, besides `image`
    "id": pa.string(),
    "index": pa.int64(),
    "prompt": pa.string(),
    "aspect_ratio": pa.string(),
    "image_size": pa.string(),
    "model": pa.string(),
    "served_model": pa.string(),
    "service_tier": pa.string(),
    "provider": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
    "sha256": pa.string(),
    "bytes": pa.int64(),
    "created_at": pa.string(),
    "aspect_ratio_mismatch": pa.bool_(),
}
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
VALUE = {pa.string(): "string", pa.int64(): "int64", pa.bool_(): "bool"}


def schema() -> pa.Schema:
    """The shards' schema, with the features `datasets` reads from its `huggingface` metadata."""
    features: dict[str, Any] = {"image": {"_type": "Image"}}
    features |= {name: {"dtype": VALUE[kind], "_type": "Value"} for name, kind in COLUMNS.items()}
    fields = [pa.field("image", IMAGE), *(pa.field(name, kind) for name, kind in COLUMNS.items())]
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def export_parquet(
    store: Store,
    state: State,
    target: Store,
    prefix: str,
    shard_size_mb: float,
    license_id: str,
    on_row: Callable[[], object] = lambda: None,
) -> list[str]:
    """Write `store`'s images and metadata as parquet shards and a card into `target` (under
    `prefix`); the shards' names. Each shard is written whole in the spool before it is put in place."""
    target.prepare()
    figures = Figures()
    spooled: list[Any] = []
    with state:
        rows = (json.loads(line) for line in state.images())
        shard = _Shard(target.spool / f".shard-{len(spooled)}.parquet")
        for row in rows:
            with store.open(row["file_name"]) as source:
                data = source.read()
            shard.add(row, data)
            figures.add(row)
            on_row()
            if shard.size >= shard_size_mb * 1_000_000:
                spooled.append(shard.close())
                shard = _Shard(target.spool / f".shard-{len(spooled)}.parquet")
        if shard.rows or not spooled:
            spooled.append(shard.close())
    names = []
    try:
        for n, path in enumerate(spooled):
            name = f"{prefix}data/train-{n:05d}-of-{len(spooled):05d}.parquet"
            target.put(path, name, replace=True)
            names.append(f"{target.url}/{name}")
        card = target.spool / ".README.md"
        card.write_text(figures.card(license_id, len(spooled)), encoding="utf-8")
        target.put(card, f"{prefix}README.md", replace=True)
    finally:
        target.close()
    return names


class _Shard:
    """One parquet file being written: rows buffered up to a row group, then flushed."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.writer = pq.ParquetWriter(path, schema())
        self.rows = 0
        self.size = 0  # bytes of image data written or buffered
        self._buffer: list[dict[str, Any]] = []
        self._buffered = 0

    def add(self, row: dict[str, Any], data: bytes) -> None:
        record = {name: row.get(name) for name in COLUMNS}
        record["image"] = {"bytes": data, "path": row["file_name"]}
        self._buffer.append(record)
        self._buffered += len(data)
        self.rows += 1
        self.size += len(data)
        if self._buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self.writer.write_table(pa.Table.from_pylist(self._buffer, schema=schema()))
            self._buffer, self._buffered = [], 0

    def close(self) -> Any:
        self._flush()
        self.writer.close()
        return self.path


class Figures:
    """What the card says of the dataset: counts, models, providers, dates."""

    def __init__(self) -> None:
        self.images = 0
        self.models: Counter[str] = Counter()
        self.providers: Counter[str] = Counter()
        self.first: str | None = None
        self.last: str | None = None

    def add(self, row: dict[str, Any]) -> None:
        self.images += 1
        self.models[str(row.get("served_model") or row.get("model"))] += 1
        self.providers[str(row.get("provider") or "-")] += 1
        made = row.get("created_at")
        if isinstance(made, str):
            self.first = min(self.first or made, made)
            self.last = max(self.last or made, made)

    def card(self, license_id: str, shards: int) -> str:
        """The dataset card: YAML front matter the Hub reads, then a body people read."""
        front = {
            "license": license_id,
            "task_categories": ["text-to-image"],
            "tags": ["synthetic", "ai-generated"],
            "size_categories": [size_category(self.images)],
            "configs": [
                {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}
            ],
        }
        listing = "\n".join(f"- `{name}`: {count}" for name, count in self.models.most_common())
        providers = "\n".join(f"- `{name}`: {count}" for name, count in self.providers.most_common())
        return "\n".join(_lines(front, listing, providers, self, shards))


def _lines(
    front: dict[str, Any], models: str, providers: str, figures: Figures, shards: int
) -> Iterator[str]:
    yield "---"
    yield yaml.safe_dump(front, sort_keys=False).rstrip()
    yield "---"
    yield ""
    yield "# AI-generated images"
    yield ""
    yield f"{figures.images} images in {shards} parquet shard(s), made with the imagegen pipeline"
    yield f"between {figures.first or '-'} and {figures.last or '-'} (UTC); exported {_now()}."
    yield ""
    yield "## Models that made them\n"
    yield models or "- none"
    yield "\n## Providers\n"
    yield providers or "- none"
    yield "\n## Loading\n"
    yield "```python\nfrom datasets import load_dataset\n"
    yield 'dataset = load_dataset("parquet", data_files={"train": "data/train-*.parquet"}, split="train")'
    yield 'dataset = load_dataset("path/to/this/folder", split="train")  # the same, through this card'
    yield "```\n"
    yield "Each row has `image` (the file's bytes as generated, and its `path`) and the generation's"
    yield "metadata: prompt, id, index, aspect ratio, image size, model (and the model that served it),"
    yield "provider, width, height, sha256, bytes, created_at."
    yield "\n## Note\n"
    yield "Every image here is AI-generated. The providers' images carry their watermarks and"
    yield "provenance (Google's SynthID, C2PA manifests), kept as generated: the bytes are never re-encoded."


def size_category(count: int) -> str:
    """The Hub's size category for a number of rows."""
    for bound, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if count < bound:
            return name
    return "1M<n<10M" if count < 10_000_000 else "10M<n<100M"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
