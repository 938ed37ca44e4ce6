"""`pipeline export --format parquet`: a Hub-ready folder that `datasets` loads three ways with an
Image feature whose bytes are the stored files', several shards, and a schema `pyarrow` alone can
check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.parquet import size_category
from pipeline.simulator import Simulator
from tests.conftest import metadata, run, write_manifest


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`datasets` with no network and its caches in the test's folder."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def made(tmp_path: Path, sim: Simulator, count: int = 12) -> Path:
    sim.config.image_scale = 4
    jobs = [{"id": "p{n}", "prompt": "a painting {n}", "matrix": {"n": list(range(count))}}]
    manifest = write_manifest(tmp_path, jobs, api={"model": "gemini-3.1-flash-image"})
    assert run("run", manifest, "--quiet") == 0
    return tmp_path / "out"


@pytest.mark.usefixtures("offline_hub")
def test_the_parquet_export_loads_with_datasets_with_its_bytes(tmp_path: Path, sim: Simulator) -> None:
    import datasets

    output, folder = made(tmp_path, sim), tmp_path / "hub"
    assert (
        run(
            "export",
            output,
            "--format",
            "parquet",
            "--to",
            folder,
            "--shard-size-mb",
            "0.008",
            "--license",
            "cc-by-4.0",
        )
        == 0
    )
    shards = sorted((folder / "data").glob("*.parquet"))
    assert len(shards) > 2 and shards[0].name == f"train-00000-of-{len(shards):05d}.parquet"
    digests = {row["file_name"]: row["sha256"] for row in metadata(output)}
    files = [str(path) for path in shards]
    for dataset in (
        datasets.load_dataset("parquet", data_files={"train": files}, split="train"),
        datasets.load_dataset(str(folder), split="train"),  # through the card's configs
    ):
        assert isinstance(dataset.features["image"], datasets.Image) and len(dataset) == 12
        raw = dataset.cast_column("image", datasets.Image(decode=False))
        assert {
            row["image"]["path"]: hashlib.sha256(row["image"]["bytes"]).hexdigest() for row in raw
        } == digests
        assert dataset[0]["image"].size == (dataset[0]["width"], dataset[0]["height"])  # decodes as an image
    streamed = datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=True)
    first = next(iter(streamed.cast_column("image", datasets.Image(decode=False))))
    assert hashlib.sha256(first["image"]["bytes"]).hexdigest() == digests[first["image"]["path"]]
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "cc-by-4.0" and front["tags"] == ["synthetic", "ai-generated"]
    assert front["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert "12 images" in card and "`gemini-3.1-flash-image`: 12" in card and "SynthID" in card


def test_the_schema_as_pyarrow_alone_reads_it(tmp_path: Path, sim: Simulator) -> None:
    output = made(tmp_path, sim, 3)
    assert run("export", output, "--format", "parquet") == 0  # default: OUTPUT/parquet
    [shard] = (output / "parquet" / "data").glob("*.parquet")
    schema = pq.read_schema(shard)
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["prompt"] == {
        "dtype": "string",
        "_type": "Value",
    }
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    table = pq.read_table(shard)
    stored = (output / table["image"][0]["path"].as_py()).read_bytes()
    assert table["image"][0]["bytes"].as_py() == stored  # never re-encoded
    assert table.num_rows == 3 and set(table.column_names) >= {"prompt", "sha256", "model", "provider"}


def test_size_categories() -> None:
    assert [size_category(n) for n in (5, 5_000, 50_000, 500_000, 5_000_000)] == [
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "100K<n<1M",
        "1M<n<10M",
    ]
