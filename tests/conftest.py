"""Shared fixtures: one provider simulator on loopback for the session, reset before each test."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from pipeline.cli import main
from pipeline.simulator import SimConfig, Simulator, SimulatorThread

KEY = "sk-test-MARKER-7f3a9c2e"  # a unique string: it must never show up outside the API request


@pytest.fixture(scope="session")
def _simulator() -> Iterator[Simulator]:
    with SimulatorThread(SimConfig(key=KEY)) as simulator:
        yield simulator


@pytest.fixture
def sim(_simulator: Simulator, monkeypatch: pytest.MonkeyPatch) -> Simulator:
    _simulator.reset(SimConfig(key=KEY))
    monkeypatch.setenv("IMAGE_API_BASE_URL", _simulator.base_url)
    monkeypatch.setenv("IMAGE_API_KEY", KEY)
    return _simulator


def flash_size(ratio: str) -> tuple[int, int] | None:
    """The pixels gemini-2.5-flash-image makes at an aspect ratio (the catalog's table)."""
    from pipeline.catalog import shipped

    model = shipped().find("gemini-2.5-flash-image")
    return model.expected(ratio, None) if model else None


def write_manifest(folder: Path, jobs: list[dict[str, Any]], **top: Any) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"output": str(folder / "out"), **top, "jobs": jobs}, allow_unicode=True))
    return path


def run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def metadata(output: Path) -> list[dict[str, Any]]:
    text = (output / "metadata.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def failures(output: Path) -> list[dict[str, Any]]:
    text = (output / "failures.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def assert_dataset_consistent(output: Path) -> list[dict[str, Any]]:
    """Every file in images/ has one metadata row and vice versa; every file decodes and matches."""
    import hashlib

    rows = metadata(output)
    files = sorted(p.name for p in (output / "images").iterdir())
    assert sorted(Path(r["file_name"]).name for r in rows) == files
    for row in rows:
        data = (output / row["file_name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["bytes"]
        with Image.open(output / row["file_name"]) as image:
            image.load()
            assert image.size == (row["width"], row["height"])
    assert not list((output / ".partial").iterdir()) if (output / ".partial").exists() else True
    return rows


PYTHON = sys.executable


@pytest.fixture(scope="session")
def _postgres() -> Iterator[Any]:
    from tests.servers import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    with postgres_server() as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv("PGPASSWORD", server.password)  # read by libpq, as a user's would be
        yield server


@pytest.fixture
def pg_url(_postgres: Any, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's PostgreSQL server: postgresql://pipeline@127.0.0.1:PORT/NAME."""
    import re

    return str(_postgres.create_database(re.sub(r"\W", "_", request.node.name)[:40] + f"_{id(request)}"))


@pytest.fixture(scope="session")
def _s3() -> Iterator[Any]:
    from tests.servers import S3_ENV, s3_server

    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_ENV.items():
            patch.setenv(name, value)
        with s3_server() as server:
            patch.setenv("AWS_ENDPOINT_URL", server.endpoint)  # any S3 client that is not told: ours
            yield server


@pytest.fixture
def s3_url(_s3: Any, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the session's S3 server, as s3://BUCKET/out; endpoint in `s3_options`."""
    import re

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{id(request) % 10**6}"
    return f"{_s3.bucket(name)}/out"


@pytest.fixture
def s3_options(_s3: Any) -> dict[str, str]:
    return {"endpoint_url": _s3.endpoint}
