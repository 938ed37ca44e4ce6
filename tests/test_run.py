"""The main job end to end, over real HTTP to the simulator: files, bytes, counts, exit codes."""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from pipeline.lock import OutputLock
from pipeline.simulator import Simulator
from tests.conftest import KEY, assert_dataset_consistent, failures, flash_size, metadata, run, write_manifest

JOBS = [
    {
        "id": "kitten",
        "prompt": "A cute orange kitten on a rainbow bridge",
        "aspect_ratio": "16:9",
        "count": 2,
    },
    {"id": "panda", "prompt": "一只熊猫在竹林里喝茶", "aspect_ratio": "4:3"},
    {"prompt": "A red bicycle poster", "aspect_ratio": "2:3"},
    {"id": "skyline", "prompt": "Futuristic skyline", "aspect_ratio": "21:9"},
    {"id": "wallpaper", "prompt": "Fluid gradient wallpaper", "aspect_ratio": "9:16", "count": 3},
    {"id": "owl", "prompt": "Pencil sketch of an owl"},
]
ITEMS = 9


def test_end_to_end(tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, JOBS, concurrency=3)
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    rows = assert_dataset_consistent(out)
    assert len(rows) == ITEMS and sim.stats.generations == ITEMS
    for row in rows:
        assert (row["width"], row["height"]) == flash_size(row["aspect_ratio"])
        assert row["file_name"] == f"images/{row['id']}_{row['index']}.png"
        assert row["model"] == "gemini-2.5-flash-image" and row["aspect_ratio_mismatch"] is False
        assert set(row) >= {"prompt", "sha256", "bytes", "created_at"}
    assert {r["prompt"] for r in rows} == {j["prompt"] for j in JOBS}
    assert len({r["sha256"] for r in rows}) == ITEMS  # pictures differ per prompt and per index
    assert failures(out) == []
    assert sim.stats.image_auth_headers == 0
    assert f"done {ITEMS} of {ITEMS} (new {ITEMS}, already done 0)" in capsys.readouterr().out


def test_rerun_of_a_finished_manifest_makes_no_request(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, JOBS)
    assert run("run", manifest) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out/images").iterdir()}
    sim.reset(sim.config)
    assert run("run", manifest) == 0
    assert sim.stats.requests == 0 and sim.stats.image_requests == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out/images").iterdir()} == before
    assert f"(new 0, already done {ITEMS})" in capsys.readouterr().out


def test_editing_one_prompt_regenerates_only_its_items(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, JOBS)
    assert run("run", manifest) == 0
    before = {r["file_name"]: r["sha256"] for r in metadata(tmp_path / "out")}
    edited = [dict(j, prompt="A sleepy grey kitten") if j.get("id") == "kitten" else j for j in JOBS]
    write_manifest(tmp_path, edited)
    sim.reset(sim.config)
    assert run("run", manifest) == 0
    assert sim.stats.generations == 2 and set(sim.stats.prompts) == {"A sleepy grey kitten"}
    rows = {r["file_name"]: r for r in assert_dataset_consistent(tmp_path / "out")}
    changed = {name for name, sha in before.items() if rows[name]["sha256"] != sha}
    assert changed == {"images/kitten_0.png", "images/kitten_1.png"}
    assert rows["images/kitten_0.png"]["prompt"] == "A sleepy grey kitten"


def test_aspect_ratio_change_regenerates(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "aspect_ratio": "1:1"}])
    assert run("run", manifest) == 0
    write_manifest(tmp_path, [{"id": "a", "prompt": "x", "aspect_ratio": "3:2"}])
    assert run("run", manifest) == 0
    assert sim.stats.generations == 2
    [row] = assert_dataset_consistent(tmp_path / "out")
    assert (row["width"], row["height"]) == (1248, 832)


def test_concurrency_limit_is_never_exceeded(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s, sim.config.jitter_s = 0.05, 0.03
    manifest = write_manifest(tmp_path, [{"id": "many", "prompt": "a dot", "count": 30}], concurrency=3)
    assert run("run", manifest) == 0
    assert sim.stats.peak_in_flight == 3
    assert run("run", manifest, "--concurrency", "5", "--output", tmp_path / "other") == 0
    assert sim.stats.peak_in_flight == 5


def test_refusal_is_recorded_and_not_paid_for_again(tmp_path: Path, sim: Simulator) -> None:
    sim.config.refuse_words = ("forbidden",)
    jobs = [{"id": "ok", "prompt": "a cat"}, {"id": "bad", "prompt": "something forbidden"}]
    manifest = write_manifest(tmp_path, jobs)
    assert run("run", manifest) == 1
    out = tmp_path / "out"
    assert [f["id"] for f in failures(out)] == ["bad"]
    assert failures(out)[0]["error_type"] == "refusal" and failures(out)[0]["attempts"] == 1
    assert [r["id"] for r in metadata(out)] == ["ok"]
    sim.reset(sim.config)
    assert run("run", manifest) == 1  # still failed, and nothing was sent
    assert sim.stats.requests == 0
    assert run("run", manifest, "--retry-failed") == 1
    assert sim.stats.requests == 1


def test_recorded_fresh_url_is_downloaded_without_a_new_generation(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 2}])
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    died_after_recording_the_url(out, 1, sim.image_url("1:1", "00ff00ff00ff00ff"), age_s=0)
    sim.reset(sim.config)
    assert run("run", manifest) == 0
    assert sim.stats.requests == 0 and sim.stats.downloads == 1
    assert len(assert_dataset_consistent(out)) == 2


def test_expired_url_leads_to_exactly_one_new_generation(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    died_after_recording_the_url(out, 0, sim.image_url("1:1", "00ff00ff00ff00ff"), age_s=7200)
    sim.reset(sim.config)
    assert run("run", manifest) == 0
    assert sim.stats.generations == 1 and sim.stats.image_requests == 1


def test_url_expiring_on_the_image_host_goes_back_to_generation(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    expired = sim.image_url("1:1", "00ff00ff00ff00ff", expires=1)  # the host answers 403
    died_after_recording_the_url(out, 0, expired, age_s=0)
    sim.reset(sim.config)
    assert run("run", manifest) == 0
    assert sim.stats.generations == 1 and sim.stats.image_requests == 2
    assert len(assert_dataset_consistent(out)) == 1


def test_finished_file_whose_state_write_was_lost_is_adopted(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 2}])
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    sha = metadata(out)[1]["sha256"]
    _sql(out, "UPDATE items SET status='url', url=NULL, image=NULL, image_fp=NULL, file=NULL WHERE idx=1")
    sim.reset(sim.config)
    assert run("run", manifest) == 0
    assert sim.stats.requests == 0 and sim.stats.image_requests == 0
    rows = assert_dataset_consistent(out)
    assert len(rows) == 2 and rows[1]["sha256"] == sha


def test_corrupt_leftover_is_not_adopted(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    (out / "images/a_0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _sql(out, "UPDATE items SET status='url', url=NULL, image=NULL, image_fp=NULL, file=NULL")
    assert run("run", manifest) == 0
    assert sim.stats.generations == 2
    assert len(assert_dataset_consistent(out)) == 1


def test_second_run_on_a_locked_output_exits_75(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
    (tmp_path / "out").mkdir()
    with OutputLock(tmp_path / "out"):
        assert run("run", manifest) == 75
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert sim.stats.requests == 0
    assert run("run", manifest) == 0


def test_bad_key_stops_the_run_with_exit_3(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGE_API_KEY", "sk-wrong-key")
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 50}], concurrency=4)
    assert run("run", manifest) == 3
    assert sim.stats.requests <= 4
    out = capsys.readouterr().out
    assert (
        "stopped: fatal provider error: no provider left (default: Invalid token (request id: sim-auth)"
        in out
    )
    assert failures(tmp_path / "out") == []  # nothing is recorded as failed: all items resumable
    monkeypatch.setenv("IMAGE_API_KEY", KEY)
    assert run("run", manifest) == 0
    assert len(metadata(tmp_path / "out")) == 50


def test_key_never_leaves_the_api_request(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.rate_500 = 0.2
    manifest = write_manifest(tmp_path, JOBS)
    assert run("run", manifest, "--log-format", "json") in (0, 1)
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert sim.stats.image_auth_headers == 0 and sim.stats.image_requests > 0


def test_images_decode_as_real_pngs(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "aspect_ratio": "5:4"}])
    assert run("run", manifest) == 0
    with Image.open(tmp_path / "out/images/a_0.png") as image:
        assert image.format == "PNG" and image.size == (1152, 896)


def died_after_recording_the_url(output: Path, index: int, url: str, age_s: float) -> None:
    """The state of a run killed after it recorded item a_<index>'s URL, `age_s` ago."""
    (output / f"images/a_{index}.png").unlink()
    _sql(
        output,
        "UPDATE items SET status='url', url=?, url_at=strftime('%s','now') - ?, image=NULL,"
        " image_fp=NULL, file=NULL WHERE idx=?",
        url,
        age_s,
        index,
    )


def _sql(output: Path, statement: str, *params: object) -> None:
    with sqlite3.connect(output / "state.db") as db:
        db.execute(statement, params)


def test_a_regenerated_image_in_another_format_replaces_the_old_file(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x"}])
    assert run("run", manifest) == 0
    jpeg = io.BytesIO()
    Image.new("RGB", (1024, 1024), "orange").save(jpeg, "JPEG")
    sim.config.image_bytes = jpeg.getvalue()  # relays label JPEG bytes as PNG: trust the bytes
    write_manifest(tmp_path, [{"id": "a", "prompt": "y"}])
    assert run("run", manifest) == 0
    [row] = assert_dataset_consistent(tmp_path / "out")
    assert row["file_name"] == "images/a_0.jpg" and row["prompt"] == "y"
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == ["a_0.jpg"]


def test_adoption_never_takes_another_items_file(tmp_path: Path, sim: Simulator) -> None:
    # ids may contain dots: "v_1.x_0.png" (item v_1.x, index 0) must not pass for item v_1's image
    manifest = write_manifest(
        tmp_path, [{"id": "v", "prompt": "x", "count": 2}, {"id": "v_1.x", "prompt": "y"}]
    )
    assert run("run", manifest) == 0
    out = tmp_path / "out"
    (out / "images/v_1.png").unlink()
    _sql(
        out,
        "UPDATE items SET status='url', url=NULL, image=NULL, image_fp=NULL, file=NULL WHERE id='v' AND idx=1",
    )
    assert run("run", manifest) == 0
    rows = {(r["id"], r["index"]): r for r in assert_dataset_consistent(out)}
    assert rows[("v", 1)]["file_name"] == "images/v_1.png" and rows[("v", 1)]["prompt"] == "x"
    assert rows[("v_1.x", 0)]["file_name"] == "images/v_1.x_0.png"
    assert sim.stats.generations == 4  # v_1 was generated again, not taken from its neighbour
