"""The plan: the pure decision table, and `run --dry-run` against a prepared output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.item import Item, item_fingerprint
from pipeline.plan import Step, decide
from pipeline.simulator import Simulator
from pipeline.state import Row
from tests.conftest import run, write_manifest

ITEM = Item("a", 0, "cat", "1:1", "m", item_fingerprint("cat", "1:1", "m"))
FP, OLD = ITEM.fingerprint, "0" * 20
NOW, TTL = 10_000.0, 3600.0


def row(
    status: str,
    fp: str = FP,
    image_fp: str | None = None,
    url: str | None = None,
    url_at: float | None = None,
    error: str | None = None,
) -> Row:
    return Row(fp, status, 1, url, url_at, error, image_fp, "images/a_0.png" if image_fp else None, None)


CASES = {
    "never seen": (None, False, False, Step.GENERATE),
    "done, file present": (row("done", image_fp=FP), True, False, Step.DONE),
    "done, file deleted": (row("done", image_fp=FP), False, False, Step.GENERATE),
    "prompt edited since": (row("done", fp=OLD, image_fp=OLD), True, False, Step.GENERATE),
    "prompt edited, new work pending": (
        row("url", image_fp=OLD, url="u", url_at=NOW),
        True,
        False,
        Step.DOWNLOAD,
    ),
    "fresh URL": (row("url", url="u", url_at=NOW - 60), False, False, Step.DOWNLOAD),
    "stale URL": (row("url", url="u", url_at=NOW - TTL - 1), False, False, Step.ADOPT),
    "inline image, no URL": (row("url"), False, False, Step.ADOPT),
    "refused": (row("failed", error="refusal"), False, False, Step.FAILED),
    "refused, --retry-failed": (row("failed", error="refusal"), False, True, Step.GENERATE),
    "failed transiently": (row("failed", error="server_error"), False, False, Step.GENERATE),
    "failed, prompt edited": (row("failed", fp=OLD, error="refusal"), False, False, Step.GENERATE),
}


@pytest.mark.parametrize(("state", "exists", "retry_failed", "expected"), CASES.values(), ids=CASES.keys())
def test_decide(state: Row | None, exists: bool, retry_failed: bool, expected: Step) -> None:
    assert decide(ITEM, state, exists, NOW, TTL, retry_failed) is expected


def test_dry_run_against_a_prepared_output(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.refuse_words = ("forbidden",)
    jobs = [
        {"id": "a", "prompt": "cat", "count": 2},
        {"id": "b", "prompt": "forbidden"},
        {"id": "c", "prompt": "gone soon"},
        {"id": "d", "prompt": "kept", "count": 3},
    ]
    manifest = write_manifest(tmp_path, jobs)
    assert run("run", manifest) == 1
    (tmp_path / "out/images/d_2.png").unlink()
    edited = [
        {"id": "a", "prompt": "dog", "count": 2},
        {"id": "b", "prompt": "forbidden"},
        {"id": "d", "prompt": "kept", "count": 3},
        {"id": "e", "prompt": "new", "count": 4},
    ]
    write_manifest(tmp_path, edited, concurrency=2, price_per_image=0.5)
    state_before = (tmp_path / "out/state.db").stat().st_mtime_ns
    sim.reset(sim.config)
    capsys.readouterr()
    assert run("run", manifest, "--dry-run", "--log-format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan == {
        "event": "plan",
        "output": str(tmp_path / "out"),
        "items": 10,
        "new": 4,
        "changed": 2,
        "done": 2,
        "failed": 1,
        "retry": 1,
        "download": 0,
        "resume": 0,
        "orphaned": 1,
        "paid_requests": 7,
        "cost_usd": 3.5,
        "unpriced": 0,
        "duration_s": 60,
        "concurrency": 2,
    }
    assert sim.stats.requests == 0 and (tmp_path / "out/state.db").stat().st_mtime_ns == state_before
    assert run("run", manifest, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "paid requests <= 7, about $3.50 at $0.5/image, about 1m00s at concurrency 2" in text


def test_dry_run_of_a_fresh_output_creates_nothing(tmp_path: Path, sim: Simulator) -> None:
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 3}])
    assert run("run", manifest, "--dry-run") == 0
    assert not (tmp_path / "out").exists() and sim.stats.requests == 0
