"""Batch Mode over real HTTP against the simulator's Files and Batch endpoints: jobs, resume, adoption,
re-batching, expiry, submit-only, and a results file of hundreds of MB collected in flat memory."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.simulator import SimConfig, Simulator
from tests.conftest import KEY, PYTHON, assert_dataset_consistent, failures, metadata, run, write_manifest

FAST = {"poll_interval_s": 0.05}


@pytest.fixture
def gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)


def batch_manifest(folder: Path, sim: Simulator, count: int, mode: str = "batch", **top: Any) -> Path:
    jobs = top.pop("jobs", [{"id": "p{n}", "prompt": "picture {n}", "matrix": {"n": list(range(count))}}])
    providers = [
        {
            "name": "google-batch",
            "protocol": "gemini",
            "mode": mode,
            "base_url": sim.origin,
            "api_key_env": "GEMINI_API_KEY",
            "price_per_image": 0.0195,
        }
    ]
    return write_manifest(folder, jobs, providers=providers, **{"batch": FAST, **top})


@contextmanager
def run_until_a_job_exists(manifest: Path, sim: Simulator) -> Iterator[subprocess.Popen[bytes]]:
    """`pipeline run` in a process of its own, handed over once the provider has a job; killed after."""
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", "run", str(manifest), "--quiet"])
    try:
        deadline = time.monotonic() + 30
        while sim.batch.stats["creates"] < 1:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def digests(output: Path) -> dict[str, str]:
    return {row["file_name"]: row["sha256"] for row in metadata(output)}


@pytest.mark.usefixtures("gemini_key")
def test_200_items_in_jobs_of_80_match_the_online_images(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.image_scale = 8
    manifest = batch_manifest(tmp_path, sim, 200, batch={**FAST, "max_requests": 80})
    assert run("run", manifest, "--dry-run", "--log-format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["batch_jobs"], plan["paid_requests"], plan["cost_usd"]) == (3, 200, round(200 * 0.0195, 2))
    assert run("run", manifest) == 0
    assert sim.batch.stats["creates"] == 3 and sim.batch.stats["uploads"] == 3
    rows = assert_dataset_consistent(tmp_path / "out")
    assert len(rows) == 200 and {r["provider"] for r in rows} == {"google-batch"}
    assert set(sim.stats.prompts.values()) == {1}
    assert sim.batch.files == {}  # inputs and results deleted after collection
    batch_images = digests(tmp_path / "out")
    sim.reset(SimConfig(key=KEY, image_scale=8))
    (tmp_path / "online").mkdir()
    online = batch_manifest(tmp_path / "online", sim, 200, mode="online")
    assert run("run", online) == 0
    assert digests(tmp_path / "online/out") == batch_images  # byte for byte
    assert run("run", manifest) == 0 and sim.batch.stats["creates"] == 0  # nothing left: no job


@pytest.mark.usefixtures("gemini_key")
def test_a_lost_create_reply_is_adopted_by_display_name(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.image_scale, sim.config.batch_lose_creates = 8, 1
    manifest = batch_manifest(tmp_path, sim, 30)
    assert run("run", manifest, "--log-format", "json") == 0
    assert sim.batch.stats["creates"] == 1 and sim.batch.stats["lost_creates"] == 1
    assert len(metadata(tmp_path / "out")) == 30 and set(sim.stats.prompts.values()) == {1}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["providers"]["google-batch"]["batch_jobs"]["adopted"] == 1


@pytest.mark.usefixtures("gemini_key")
def test_retryable_lines_are_rebatched_and_refusals_recorded(tmp_path: Path, sim: Simulator) -> None:
    sim.config.image_scale, sim.config.refuse_words = 8, ("forbidden",)
    sim.config.batch_rate_429, sim.config.batch_rate_500 = 0.1, 0.1
    jobs = [
        {"id": "p{n}", "prompt": "picture {n}", "matrix": {"n": list(range(60))}},
        {"id": "no", "prompt": "something forbidden"},
    ]
    manifest = batch_manifest(tmp_path, sim, 0, jobs=jobs)
    assert run("run", manifest) == 1
    assert len(metadata(tmp_path / "out")) == 60
    assert [(f["id"], f["error_type"]) for f in failures(tmp_path / "out")] == [("no", "refusal")]
    assert sim.batch.stats["creates"] >= 2  # the retryable lines went into a later job
    assert set(sim.stats.prompts.values()) == {1}


@pytest.mark.usefixtures("gemini_key")
def test_a_batch_api_down_for_max_outage_ends_the_run_with_75(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.batch_polls_fail = True
    manifest = batch_manifest(tmp_path, sim, 12, max_outage_s=0.5)
    assert run("run", manifest, "--quiet") == 75  # try later: the job stays recorded
    assert sim.batch.stats["creates"] == 1 and metadata(tmp_path / "out") == []
    sim.config.batch_polls_fail = False
    capsys.readouterr()
    assert run("run", manifest, "--quiet") == 0  # the same job, collected
    assert "done 12 of 12 (new 12, already done 0)" in capsys.readouterr().out
    assert sim.batch.stats["creates"] == 1 and len(metadata(tmp_path / "out")) == 12


@pytest.mark.usefixtures("gemini_key")
def test_an_expired_job_gives_its_items_back(tmp_path: Path, sim: Simulator) -> None:
    sim.config.image_scale, sim.config.batch_end_states = 8, ("EXPIRED",)
    manifest = batch_manifest(tmp_path, sim, 20)
    assert run("run", manifest) == 0
    assert sim.batch.stats["creates"] == 2 and len(metadata(tmp_path / "out")) == 20


@pytest.mark.usefixtures("gemini_key")
def test_submit_only_then_a_collecting_run(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.image_scale, sim.config.batch_duration_s = 8, 0.5
    manifest = batch_manifest(tmp_path, sim, 25, batch={**FAST, "max_requests": 10})
    assert run("run", manifest, "--submit-only") == 0
    assert sim.batch.stats["creates"] == 3 and metadata(tmp_path / "out") == []
    capsys.readouterr()
    assert run("status", tmp_path / "out", "--json") == 0
    jobs = json.loads(capsys.readouterr().out)["batches"]
    assert [(j["stage"], j["items"]) for j in jobs] == [("active", 10), ("active", 10), ("active", 5)]
    assert all(j["name"].startswith("batches/") for j in jobs)
    assert run("run", manifest, "--submit-only") == 0
    assert sim.batch.stats["creates"] == 3  # items in submitted jobs go into no other
    assert run("run", manifest) == 0
    assert sim.batch.stats["creates"] == 3 and len(metadata(tmp_path / "out")) == 25
    assert run("status", tmp_path / "out") == 0
    assert capsys.readouterr().out.count(": collected (BATCH_STATE_SUCCEEDED), ") == 3


@pytest.mark.slow
@pytest.mark.usefixtures("gemini_key")
def test_a_run_killed_after_a_create_resumes_the_same_jobs(tmp_path: Path, sim: Simulator) -> None:
    sim.config.image_scale, sim.config.batch_duration_s = 8, 2.0
    manifest = batch_manifest(tmp_path, sim, 40, batch={**FAST, "max_requests": 20})
    with run_until_a_job_exists(manifest, sim) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    created_before = sim.batch.stats["creates"]
    assert run("run", manifest) == 0
    assert sim.batch.stats["creates"] == 2 >= created_before  # the same jobs: none made twice
    assert len(metadata(tmp_path / "out")) == 40 and set(sim.stats.prompts.values()) == {1}


PEAK_RSS = """
import atexit, re, sys
from pathlib import Path
from pipeline.cli import main
atexit.register(lambda: print("VmHWM", re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1), file=sys.stderr))
sys.argv = ["pipeline", *sys.argv[1:]]
code = main()
sys.exit(code)
"""


def _noise_png(width: int, height: int) -> bytes:
    rng = random.Random(7)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=0)
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_results_file_of_hundreds_of_mb_is_collected_in_flat_memory(tmp_path: Path, sim: Simulator) -> None:
    if shutil.disk_usage(tmp_path).free < 3_000_000_000:  # results, their download and the images
        pytest.skip("needs 3 GB of free disk for a results file of hundreds of MB")
    png = _noise_png(1024, 1024)  # 3 MB that do not compress: 4 MB a line in base64
    sim.config.image_bytes, sim.config.batch_duration_s = png, 0.1
    items = 100
    manifest = batch_manifest(tmp_path, sim, items)
    env = {**os.environ, "GEMINI_API_KEY": KEY}
    started = time.monotonic()
    result = subprocess.run(
        [PYTHON, "-c", PEAK_RSS, "run", str(manifest), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    peak_mb = int(re.findall(r"VmHWM (\d+)", result.stderr)[-1]) / 1024
    results_mb = items * len(png) * 4 / 3 / 1e6
    assert results_mb > 350
    assert peak_mb < 300, f"peak RSS {peak_mb:.0f} MB collecting {results_mb:.0f} MB of results"
    rows = metadata(tmp_path / "out")
    assert len(rows) == items and {r["sha256"] for r in rows} == {hashlib.sha256(png).hexdigest()}
    print(f"collected {results_mb:.0f} MB of results in {elapsed:.1f} s, peak RSS {peak_mb:.0f} MB")


@pytest.mark.slow
@pytest.mark.usefixtures("gemini_key")
def test_sigint_while_waiting_exits_130_at_once_with_the_jobs_recorded(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.image_scale, sim.config.batch_duration_s = 8, 30.0
    manifest = batch_manifest(tmp_path, sim, 10)
    with run_until_a_job_exists(manifest, sim) as proc:
        time.sleep(0.3)  # waiting for the job now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 130
    assert run("status", tmp_path / "out", "--json") == 0
    jobs = json.loads(capsys.readouterr().out)["batches"]
    assert [(j["stage"], j["items"]) for j in jobs] == [("active", 10)]


@pytest.mark.usefixtures("gemini_key")
def test_results_that_do_not_decode_are_retried_then_recorded(tmp_path: Path, sim: Simulator) -> None:
    """As online: bytes that do not decode are worth a new generation, within max_attempts."""
    sim.config.image_bytes = b"\x89PNG\r\n\x1a\n but not really an image"
    manifest = batch_manifest(tmp_path, sim, 5, max_attempts=2)
    assert run("run", manifest) == 1
    assert sorted((f["id"], f["error_type"], f["attempts"]) for f in failures(tmp_path / "out")) == [
        (f"p{n}", "bad_image", 2) for n in range(5)
    ]
    assert metadata(tmp_path / "out") == [] and sim.batch.stats["creates"] == 2
