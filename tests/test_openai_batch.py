"""OpenAI's Batch API for images (`mode: batch` on an `openai-images` provider) over real HTTP against
the simulator's Files and Batches endpoints: the official SDK, jobs, adoption, resume after a kill,
expiry, error lines; the same runner as Google's Batch Mode."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.simulator import Simulator
from tests.conftest import KEY, PYTHON, assert_dataset_consistent, failures, metadata, run, write_manifest
from tests.test_simulator import simulate


@pytest.fixture(autouse=True)
def _openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def manifest_for(folder: Path, sim: Simulator, count: int, mode: str = "batch", **top: Any) -> Path:
    providers = [
        {
            "name": "openai-batch",
            "protocol": "openai-images",
            "mode": mode,
            "base_url": sim.base_url,
            "model": "gpt-image-2",
        }
    ]
    jobs = [
        {"id": "p{n}", "prompt": "picture {n}", "aspect_ratio": "3:2", "matrix": {"n": list(range(count))}}
    ]
    batch = {"poll_interval_s": 0.05, **top.pop("batch", {})}
    return write_manifest(folder, jobs, providers=providers, batch=batch, **top)


def digests(output: Path) -> dict[str, str]:
    return {row["file_name"]: row["sha256"] for row in metadata(output)}


def test_the_openai_sdk_runs_an_images_batch_on_simulate(tmp_path: Path) -> None:
    from openai import OpenAI

    lines = tmp_path / "in.jsonl"
    body = {"model": "gpt-image-2", "prompt": "a lighthouse", "n": 1, "size": "1024x1024"}
    lines.write_text(
        "".join(
            json.dumps(
                {"custom_id": f"c{n}", "method": "POST", "url": "/v1/images/generations", "body": body}
            )
            + "\n"
            for n in range(3)
        )
    )
    with simulate("--key", "sk-sdk") as (_, base_url):
        client = OpenAI(base_url=base_url, api_key="sk-sdk", max_retries=0)
        with lines.open("rb") as handle:
            uploaded = client.files.create(file=handle, purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/images/generations",  # type: ignore[arg-type]
            completion_window="24h",
            metadata={"imggen_job": "sdk-test"},
        )
        deadline = time.monotonic() + 30
        while batch.status != "completed":
            assert time.monotonic() < deadline, batch.status
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        assert batch.output_file_id and batch.request_counts and batch.request_counts.completed == 3
        results = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(r["custom_id"] for r in results) == ["c0", "c1", "c2"]
        assert all(r["response"]["body"]["data"][0]["b64_json"] for r in results)
        listed = client.batches.list(limit=10)
        assert [b.id for b in listed.data] == [batch.id] and listed.data[0].metadata == {
            "imggen_job": "sdk-test"
        }


def test_120_items_in_3_batches_match_the_online_images(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    online_dir, batch_dir = tmp_path / "online", tmp_path / "batch"
    online_dir.mkdir()
    batch_dir.mkdir()
    sim.config.image_scale = 8
    assert run("run", manifest_for(online_dir, sim, 120, mode="online")) == 0
    online = digests(online_dir / "out")
    sim.reset(sim.config)
    batch = manifest_for(batch_dir, sim, 120, batch={"max_requests": 40})
    assert run("run", batch, "--dry-run") == 0
    assert "batch mode: 3 new job(s)" in capsys.readouterr().out
    assert run("run", batch) == 0
    assert sim.openai_batch.stats["creates"] == 3 and sim.stats.generations == 120
    assert digests(batch_dir / "out") == online  # byte-identical images, same names
    assert_dataset_consistent(batch_dir / "out")
    assert run("run", batch) == 0 and sim.openai_batch.stats["creates"] == 3  # a rerun: no new batch
    assert sim.openai_batch.stats["deleted_files"] >= 6  # inputs and outputs collected, deleted


def test_a_lost_create_reply_is_adopted_from_the_list(tmp_path: Path, sim: Simulator) -> None:
    sim.config.batch_lose_creates, sim.config.batch_page_size = 1, 1
    assert run("run", manifest_for(tmp_path, sim, 10)) == 0
    assert sim.openai_batch.stats["creates"] == 1 and len(metadata(tmp_path / "out")) == 10


def test_a_run_killed_after_the_create_resumes_the_same_batch(tmp_path: Path, sim: Simulator) -> None:
    sim.config.batch_duration_s = 2.0
    manifest = manifest_for(tmp_path, sim, 20)
    with subprocess.Popen([PYTHON, "-m", "pipeline", "run", str(manifest), "--quiet"]) as proc:
        deadline = time.monotonic() + 30
        while sim.openai_batch.stats["creates"] < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.kill()
    sim.config.batch_duration_s = 0.2
    assert run("run", manifest) == 0
    assert sim.openai_batch.stats["creates"] == 1 and len(metadata(tmp_path / "out")) == 20
    assert set(sim.stats.prompts.values()) == {1}  # each paid once


def test_an_expired_batch_keeps_what_it_made_and_gives_the_rest_back(tmp_path: Path, sim: Simulator) -> None:
    sim.config.batch_end_states = ("EXPIRED",)
    assert run("run", manifest_for(tmp_path, sim, 10)) == 0
    assert sim.openai_batch.stats["creates"] == 2 and len(metadata(tmp_path / "out")) == 10
    assert set(sim.stats.prompts.values()) == {1}


def test_error_lines_are_rebatched_and_refusals_recorded(tmp_path: Path, sim: Simulator) -> None:
    sim.config.batch_rate_429, sim.config.batch_rate_500 = 0.15, 0.15
    sim.config.refuse_words = ("picture 3",)
    assert run("run", manifest_for(tmp_path, sim, 30)) == 1
    assert [f["error_type"] for f in failures(tmp_path / "out")] == ["refusal"]
    assert len(metadata(tmp_path / "out")) == 29 and sim.openai_batch.stats["creates"] >= 2


def test_openai_batch_refuses_reference_images(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ref.png").write_bytes(b"")
    providers = [{"name": "o", "protocol": "openai-images", "mode": "batch", "base_url": sim.base_url}]
    path = write_manifest(tmp_path, [{"prompt": "x", "images": ["ref.png"]}], providers=providers)
    assert run("validate", path) == 2
    assert "OpenAI's batch takes no reference images" in capsys.readouterr().err


def test_an_input_file_stays_under_the_providers_byte_limit(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.providers.openai_batch import OpenAIBatchClient

    monkeypatch.setattr(OpenAIBatchClient, "max_bytes", 100_000)  # the 200 MB limit, scaled down
    long = "a harbour at dawn, " * 1500  # about 28 KB a prompt: three lines a file
    jobs = [{"id": "l{n}", "prompt": long + "{n}", "matrix": {"n": list(range(12))}}]
    providers = [
        {
            "name": "o",
            "protocol": "openai-images",
            "mode": "batch",
            "base_url": sim.base_url,
            "model": "gpt-image-2",
        }
    ]
    manifest = write_manifest(tmp_path, jobs, providers=providers, batch={"poll_interval_s": 0.05})
    assert run("run", manifest, "--quiet") == 0
    assert sim.openai_batch.stats["creates"] == 4 and len(metadata(tmp_path / "out")) == 12
