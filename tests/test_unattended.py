"""Unattended runs: signals, locking, budgets, disk full, cron output, healthchecks, secrets, hostile input."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import struct
import time
import zlib
from pathlib import Path

import pytest

from pipeline.download import Downloader
from pipeline.simulator import Simulator
from pipeline.state import State
from tests.conftest import KEY, assert_dataset_consistent, failures, metadata, run, write_manifest
from tests.test_crash import start, wait_for_generations


def test_sigterm_finishes_in_flight_work_and_exits_143(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s = 0.3
    manifest = write_manifest(tmp_path, [{"id": "t", "prompt": "term", "count": 40}], concurrency=4)
    with start(manifest, sim, "--grace-s", "20") as process:
        wait_for_generations(sim, 4, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 143
    rows = assert_dataset_consistent(tmp_path / "out")
    assert 4 <= len(rows) < 40
    assert len(rows) == sim.stats.generations  # every paid generation was downloaded before exiting
    assert failures(tmp_path / "out") == []
    assert run("run", manifest) == 0
    assert len(assert_dataset_consistent(tmp_path / "out")) == 40 == sim.stats.generations


def test_a_second_signal_stops_at_once(tmp_path: Path, sim: Simulator) -> None:
    sim.config.rate_hang, sim.config.hang_s = 1.0, 60  # every request hangs for a minute
    manifest = write_manifest(tmp_path, [{"id": "h", "prompt": "hang", "count": 10}], concurrency=4)
    with start(manifest, sim, "--grace-s", "60") as process:
        deadline = time.monotonic() + 20
        while sim.stats.in_flight < 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert process.poll() is None  # still in its grace period
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
        assert process.stderr is not None and "Traceback" not in process.stderr.read().decode()
    with sqlite3.connect(tmp_path / "out/state.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_two_runs_on_one_output(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s = 0.2
    manifest = write_manifest(tmp_path, [{"id": "l", "prompt": "lock", "count": 40}], concurrency=2)
    with start(manifest, sim) as first:
        wait_for_generations(sim, 1, first)
        with start(manifest, sim) as second:
            assert second.wait(20) == 75
            assert second.stderr is not None and f"(pid {first.pid})" in second.stderr.read().decode()
        first.send_signal(signal.SIGKILL)
    sim.config.latency_s = 0.0
    with start(manifest, sim) as third:
        assert third.wait(60) == 0  # the kernel released the dead run's lock
    assert len(assert_dataset_consistent(tmp_path / "out")) == 40


def test_disk_full_while_writing_an_image(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_commit, calls = Downloader._commit, []

    def full_disk(self: Downloader, tmp: Path, name: str, data: bytes | None, *rest: object) -> object:
        calls.append(tmp)
        if len(calls) == 3:
            tmp.write_bytes((data or b"")[:100])  # half-written, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_commit(self, tmp, name, data, *rest)

    monkeypatch.setattr(Downloader, "_commit", full_disk)
    manifest = write_manifest(tmp_path, [{"id": "d", "prompt": "disk", "count": 6}], concurrency=1)
    assert run("run", manifest) == 74
    assert (
        "stopped: cannot write the output: cannot write d_2: No space left on device"
        in capsys.readouterr().out
    )
    out = tmp_path / "out"
    rows = assert_dataset_consistent(out)  # in-flight items finished in the grace period; d_2 left nothing
    assert 2 <= len(rows) < 6 and "images/d_2.png" not in {r["file_name"] for r in rows}
    assert not list((out / ".partial").iterdir()) and not (out / "images/d_2.png").exists()
    monkeypatch.setattr(Downloader, "_commit", real_commit)
    assert run("run", manifest) == 0
    assert len(assert_dataset_consistent(out)) == 6
    assert sim.stats.generations == 6  # the item whose write failed was downloaded again, not paid again


def test_disk_full_while_writing_the_state(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_done, calls = State.record_done, []

    def full_disk(self: State, *args: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        real_done(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(State, "record_done", full_disk)
    manifest = write_manifest(tmp_path, [{"id": "s", "prompt": "state", "count": 4}], concurrency=1)
    assert run("run", manifest) == 74
    monkeypatch.setattr(State, "record_done", real_done)
    assert run("run", manifest) == 0
    assert len(assert_dataset_consistent(tmp_path / "out")) == 4
    assert sim.stats.generations == 4  # the image whose record was lost was adopted, not paid again


def test_lost_state_write_after_a_prompt_edit_adopts_the_new_image(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path, [{"id": "e", "prompt": "before"}])
    assert run("run", manifest) == 0
    write_manifest(tmp_path, [{"id": "e", "prompt": "after"}])

    def lost(self: State, *args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(State, "record_done", lost)
        assert run("run", manifest) == 74  # the new image replaced the old file; its record was lost
    assert run("run", manifest) == 0
    [row] = assert_dataset_consistent(tmp_path / "out")
    assert row["prompt"] == "after" and sim.stats.generations == 2


def test_max_requests_stops_where_it_says(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, [{"id": "b", "prompt": "budget", "count": 20}], concurrency=4)
    assert run("run", manifest, "--max-requests", "7") == 0
    assert sim.stats.requests == 7 and len(metadata(tmp_path / "out")) == 7
    assert "stopped early: max_requests" in capsys.readouterr().out
    write_manifest(tmp_path, [{"id": "b", "prompt": "budget", "count": 20}], concurrency=4, max_requests=5)
    assert run("run", manifest) == 0
    assert sim.stats.requests == 12
    assert run("run", manifest) == 0
    assert sim.stats.requests == 17 and len(metadata(tmp_path / "out")) == 17


def test_max_duration_stops_taking_items(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.latency_s = 0.2
    manifest = write_manifest(tmp_path, [{"id": "m", "prompt": "time", "count": 100}], concurrency=2)
    assert run("run", manifest, "--max-duration", "0.5", "--log-format", "json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["stopped"] == "max_duration" and 0 < summary["done"] < 100
    assert summary["remaining"] == 100 - summary["done"] and summary["exit_code"] == 0
    assert len(assert_dataset_consistent(tmp_path / "out")) == summary["done"] == sim.stats.generations


def test_cron_output_plain_quiet_and_json(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.refuse_words = ("nope",)
    jobs = [{"id": "a", "prompt": "fine", "count": 3}, {"id": "b", "prompt": "nope"}]
    manifest = write_manifest(tmp_path, jobs)
    assert run("run", manifest, "--output", tmp_path / "plain") == 1
    plain = capsys.readouterr()
    assert "%|" not in plain.out and "\r" not in plain.out  # no progress bar off a terminal
    assert "failed: b_0: refusal" in plain.err
    assert run("run", manifest, "--quiet", "--output", tmp_path / "quiet") == 1
    quiet = capsys.readouterr()
    assert quiet.out.splitlines()[0].startswith("done 3 of 4") and "failed: b_0" in quiet.err
    assert run("run", manifest, "--log-format", "json", "--output", tmp_path / "json") == 1
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "summary"
    assert kinds.count("item_done") == 3 and kinds.count("item_failed") == 1
    assert events[-1]["failed"] == {"refusal": 1} and events[-1]["exit_code"] == 1


def test_healthcheck_pings_start_and_result(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(
        tmp_path, [{"id": "a", "prompt": "x"}], healthcheck_url=f"{sim.base_url[:-3]}/hc/job"
    )
    assert run("run", manifest) == 0
    assert list(sim.stats.pings) == ["job/start", "job"]
    sim.config.refuse_words = ("y",)
    write_manifest(tmp_path, [{"id": "b", "prompt": "y"}], healthcheck_url=f"{sim.base_url[:-3]}/hc/job")
    assert run("run", manifest) == 1
    assert list(sim.stats.pings)[-2:] == ["job/start", "job/fail"]


def test_an_unreachable_healthcheck_never_fails_the_run(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], healthcheck_url="http://127.0.0.1:9/hc")
    assert run("run", manifest) == 0


def test_the_key_never_leaks_even_when_the_gateway_echoes_it(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.echo_auth = True
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}], api={"model": "gemini-9-imaginary"})
    for log_format in ("text", "json"):
        assert run("run", manifest, "--log-format", log_format, "--retry-failed") == 1
    captured = capsys.readouterr()
    assert "sent with Bearer [secret]" in captured.err and KEY not in captured.out + captured.err
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert "[secret]" in failures(tmp_path / "out")[0]["message"]


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that announces absurd dimensions: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


HOSTILE_REPLIES = {
    "file URL": (
        {"reply_content": "![x](file:///etc/passwd)"},
        {},
        "bad_reference",
        "only http(s) and data: URIs",
    ),
    "javascript URL": (
        {"reply_content": "![x](javascript:alert(1))"},
        {},
        "bad_reference",
        "refused image reference",
    ),
    "data URI that is not an image": (
        {"reply_content": "![x](data:image/png;base64,aGVsbG8gd29ybGQ=)"},
        {},
        "bad_image",
        "not a usable image",
    ),
    "larger than the download cap": ({}, {"download_max_mb": 0.001}, "too_large", "download cap"),
    "image over our pixel limit": (
        {"image_bytes": png_header_only(8_000, 8_000)},
        {},
        "too_large",
        "8000x8000 pixels is over",
    ),
    "decompression bomb": (
        {"image_bytes": png_header_only(60_000, 60_000)},
        {},
        "too_large",
        "decompression bomb",
    ),
    "HTML served as the image": (
        {"image_bytes": b"<html>login</html>"},
        {},
        "bad_image",
        "not a usable image",
    ),
}


@pytest.mark.parametrize(
    ("sim_knobs", "top", "kind", "message"), HOSTILE_REPLIES.values(), ids=HOSTILE_REPLIES.keys()
)
def test_hostile_replies_fail_the_item_clearly(
    sim_knobs: dict, top: dict, kind: str, message: str, tmp_path: Path, sim: Simulator
) -> None:
    for name, value in sim_knobs.items():
        setattr(sim.config, name, value)
    manifest = write_manifest(
        tmp_path, [{"id": "h", "prompt": "x"}], max_attempts=2, backoff_base_s=0.01, **top
    )
    assert run("run", manifest) == 1
    [failure] = failures(tmp_path / "out")
    assert failure["error_type"] == kind and message in failure["message"], failure
    assert list((tmp_path / "out/images").iterdir()) == []
    assert sim.stats.requests <= 2
