"""Real gateways: every reply shape and fault of the contract replayed over HTTP by the simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.simulator import Simulator
from tests.conftest import assert_dataset_consistent, failures, flash_size, metadata, run, write_manifest

JOBS = [
    {"id": "wide", "prompt": "A wide landscape", "aspect_ratio": "16:9"},
    {"id": "tall", "prompt": "一座高塔", "aspect_ratio": "9:16", "count": 2},
]
SHAPES = ["markdown", "markdown_data", "bare_data", "images", "parts_base64", "native", "redirect"]
FAST = {"backoff_base_s": 0.02, "backoff_cap_s": 0.2}


def summary_of(capsys: pytest.CaptureFixture[str]) -> dict:
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return next(line for line in lines if line["event"] == "summary")


# Every shape over plain JSON and over SSE; native Gemini bodies are passed through whole, never streamed.
SHAPE_CASES = [
    (shape, stream) for shape in SHAPES for stream in (False, True) if not (shape == "native" and stream)
]


@pytest.mark.parametrize(
    ("shape", "stream"), SHAPE_CASES, ids=[f"{s}-{'sse' if t else 'json'}" for s, t in SHAPE_CASES]
)
def test_every_reply_shape_yields_the_image(shape: str, stream: bool, tmp_path: Path, sim: Simulator) -> None:
    sim.config.shape = shape
    manifest = write_manifest(tmp_path, JOBS, api={"stream": stream})
    assert run("run", manifest) == 0
    rows = assert_dataset_consistent(tmp_path / "out")
    assert len(rows) == 3 and sim.stats.generations == 3
    assert all((r["width"], r["height"]) == flash_size(r["aspect_ratio"]) for r in rows)
    assert sim.stats.image_auth_headers == 0


def test_chaos_run_pays_once_and_loses_nothing(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    c = sim.config
    c.latency_s, c.jitter_s, c.retry_after_s = 0.01, 0.01, 0.1
    c.rate_500, c.rate_429, c.rate_429_retry_after = 0.20, 0.05, 0.05
    c.rate_reset, c.rate_refusal, c.rate_expired, c.rate_error200 = 0.05, 0.03, 0.02, 0.02
    c.rate_truncate = 0.05
    jobs = [{"id": f"chaos-{n}", "prompt": f"chaos prompt {n}"} for n in range(320)]
    manifest = write_manifest(tmp_path, jobs, concurrency=16, max_attempts=10, **FAST)
    code = run("run", manifest, "--log-format", "json")
    summary = summary_of(capsys)
    out = tmp_path / "out"
    rows = assert_dataset_consistent(out)  # no duplicate, no corrupt file, metadata == files
    failed = failures(out)
    assert len(rows) + len(failed) == 320 and summary["remaining"] == 0
    assert {r["id"] for r in rows}.isdisjoint({f["id"] for f in failed})
    assert all(f["error_type"] == "refusal" for f in failed)  # everything else got through
    assert code == (1 if failed else 0)
    assert sim.stats.faults["refusal"] >= len(failed) > 0
    assert sim.stats.image_auth_headers == 0
    # Never paid twice: every billed generation became exactly one image, unless its URL was expired.
    assert sim.stats.generations - sim.stats.faults["expired"] == len(rows)
    print(
        f"\nchaos: items 320, requests {summary['requests']}, generations {sim.stats.generations}, "
        f"done {len(rows)}, failed {len(failed)}, retries {summary['retries']}, "
        f"faults {dict(sim.stats.faults)}, elapsed {summary['elapsed_s']}s"
    )


def test_429_storm_slows_the_whole_pool_then_recovers(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s, sim.config.image_scale = 0.02, 4
    sim.config.storm = (0.5, 2.5)
    jobs = [{"id": "storm", "prompt": "rain", "count": 600}]
    manifest = write_manifest(
        tmp_path, jobs, concurrency=12, max_attempts=50, backoff_base_s=0.05, backoff_cap_s=0.5
    )
    assert run("run", manifest, "--max-duration", "4") == 0
    times = sim.stats.request_times
    t0 = sim.stats.first_request_at or 0.0

    def rate(start: float, end: float) -> float:
        return sum(start <= t - t0 < end for t in times) / (end - start)

    before, early, late, after = rate(0.1, 0.5), rate(0.5, 1.0), rate(1.5, 2.5), rate(2.7, 3.5)
    assert late * 5 < min(before, early), (before, early, late, after)
    assert after > late * 5, (before, early, late, after)


def test_bad_key_ends_the_run_at_once(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGE_API_KEY", "sk-wrong")
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 200}], concurrency=8)
    assert run("run", manifest) == 3
    assert sim.stats.requests <= 8 and failures(tmp_path / "out") == []


def test_quota_error_as_429_is_fatal(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.quota_exhausted = True
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 100}], concurrency=4)
    assert run("run", manifest) == 3
    assert sim.stats.requests <= 4
    assert "(request id: sim-quota)" in capsys.readouterr().out


def test_the_same_permanent_error_on_many_items_stops_the_run(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [{"id": f"j{n}", "prompt": f"p{n}"} for n in range(100)]
    manifest = write_manifest(tmp_path, jobs, concurrency=2, api={"model": "gemini-9-imaginary"})
    assert run("run", manifest) == 3
    assert sim.stats.requests <= 12
    assert "the same error on 10 items in a row" in capsys.readouterr().out


def test_no_image_is_retried_once_then_recorded(tmp_path: Path, sim: Simulator) -> None:
    sim.config.rate_no_image = 1.0
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 3}], **FAST)
    assert run("run", manifest) == 1
    assert sim.stats.requests == 6
    assert [f["error_type"] for f in failures(tmp_path / "out")] == ["no_image"] * 3


def test_a_hung_request_frees_its_slot_at_the_timeout(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.rate_hang, sim.config.hang_s = 0.5, 30
    manifest = write_manifest(
        tmp_path,
        [{"id": "a", "prompt": "x", "count": 8}],
        concurrency=8,
        max_attempts=20,
        api={"timeout_s": 0.3},
        **FAST,
    )
    assert run("run", manifest, "--log-format", "json") == 0
    assert summary_of(capsys)["retries"]["timeout"] >= 1
    assert len(metadata(tmp_path / "out")) == 8


def test_ignored_aspect_ratio_keeps_the_image_with_a_warning(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.ignore_aspect_ratio = True
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "aspect_ratio": "16:9"}])
    assert run("run", manifest) == 0
    [row] = metadata(tmp_path / "out")
    assert (row["width"], row["height"]) == (1024, 1024) and row["aspect_ratio_mismatch"] is True
    assert "got 1024x1024, asked 16:9 (1344x768)" in capsys.readouterr().err


def test_errors_in_disguise_are_retried(tmp_path: Path, sim: Simulator) -> None:
    sim.config.rate_error200 = 0.5
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 10}], max_attempts=20, **FAST)
    assert run("run", manifest) == 0
    assert sim.stats.faults["error200"] > 0 and len(metadata(tmp_path / "out")) == 10


def test_truncated_downloads_are_retried_without_a_new_generation(tmp_path: Path, sim: Simulator) -> None:
    sim.config.rate_truncate = 0.2
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 10}], **FAST)
    assert run("run", manifest) == 0
    assert sim.stats.faults["truncated"] > 0
    assert sim.stats.generations == 10 and len(assert_dataset_consistent(tmp_path / "out")) == 10


def test_requests_per_minute_is_a_hard_limit(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(
        tmp_path, [{"id": "a", "prompt": "x", "count": 12}], concurrency=8, requests_per_minute=600
    )
    assert run("run", manifest) == 0
    times = sim.stats.request_times
    # 600 a minute is one every 0.1 s: no 0.5 s window may hold more than 6 (slowness only lowers it)
    assert max(sum(t <= u < t + 0.5 for u in times) for t in times) <= 6
    assert len(metadata(tmp_path / "out")) == 12


def test_image_host_5xx_and_undecodable_bodies_are_retried(tmp_path: Path, sim: Simulator) -> None:
    sim.config.rate_image_error, sim.config.rate_corrupt = 0.2, 0.1
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 20}], **FAST)
    assert run("run", manifest) == 0
    assert sim.stats.faults["image_503"] > 0 and sim.stats.faults["corrupt"] > 0
    assert len(assert_dataset_consistent(tmp_path / "out")) == 20
    assert sim.stats.generations == 20  # retried on the same URL: no download failure was paid for again
