"""The run core built without the CLI: the recorder, the pool over real HTTP, a run from `RunPlan`,
and batch mode reporting `done` only once durable, with the same size check as online."""

from __future__ import annotations

import asyncio
import base64
import io
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from pipeline.catalog import shipped
from pipeline.download import Downloader
from pipeline.errors import NoProviderLeft, PermanentError
from pipeline.events import Event, EventKind
from pipeline.item import Item, item_fingerprint
from pipeline.manifest import Keys, ProviderSpec, load_manifest
from pipeline.providers import connect
from pipeline.providers.pool import Member, Pool, Suspect
from pipeline.recorder import Recorder
from pipeline.retry import SAME_ERROR_STOP
from pipeline.run import RunPlan, RunRequest, execute
from pipeline.secret import Secret
from pipeline.simulator import Simulator
from pipeline.state import open_state
from pipeline.storage import open_store
from pipeline.summary import Summary
from tests.conftest import KEY, metadata, write_manifest

MODEL = "gemini-2.5-flash-image"


def item(n: int, ratio: str = "1:1") -> Item:
    return Item("i", n, f"prompt {n}", ratio, MODEL, item_fingerprint(f"prompt {n}", ratio, MODEL))


def png_uri(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (20, 40, 60)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def status_in_db(db: Path, name: str) -> str | None:
    with sqlite3.connect(db) as other:  # another connection: sees only what was committed
        found = other.execute("SELECT status FROM items WHERE id || '_' || idx = ?", (name,)).fetchone()
    return found[0] if found else None


def test_the_recorder_reports_done_only_once_durable_and_checks_the_size(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), {})
    store.prepare()
    state = open_state(None, str(tmp_path), tmp_path)
    state.begin()
    events: list[tuple[Event, str | None]] = []
    summary = Summary(total=3)

    def seen(event: Event) -> None:
        events.append((event, status_in_db(tmp_path / "state.db", event.item) if event.item else None))

    async def go() -> None:
        recorder = Recorder(
            state, store, summary, seen, lambda exc: pytest.fail(str(exc)), shipped().find(MODEL)
        )
        committer = asyncio.create_task(recorder.committer())
        async with aiohttp.ClientSession() as session:
            downloader = Downloader(session, store, max_bytes=10_000_000, timeout_s=5)
            square = await downloader.fetch(png_uri(1024, 1024), "i_0")
            wide = await downloader.fetch(png_uri(1024, 1024), "i_1")  # asked 16:9: 1344x768
            await asyncio.gather(
                recorder.image(item(0), square, None, "p"), recorder.image(item(1, "16:9"), wide, None, "p")
            )
            downloader.close()
        recorder.fail(item(2), PermanentError("bad prompt"), 1, "p")
        await recorder.commit()
        committer.cancel()

    asyncio.run(go())
    state.close()
    done = [(e.item, status) for e, status in events if e.kind is EventKind.DONE]
    assert sorted(done) == [("i_0", "done"), ("i_1", "done")]  # durable when reported
    warnings = [e.message for e, _ in events if e.kind is EventKind.WARNING]
    assert warnings == [
        "got 1024x1024, asked 16:9 (1344x768): p may ignore the asked size (counted, not shown again)"
    ]
    assert summary.done == 2 and summary.warnings == 1 and dict(summary.failed) == {"invalid_request": 1}
    assert summary.size_mismatches == {"p": 1}
    assert status_in_db(tmp_path / "state.db", "i_2") == "failed"


def pool_of(sim: Simulator, session: aiohttp.ClientSession, **options: Any) -> Pool:
    spec = ProviderSpec(name="relay", concurrency=2, model=options.pop("model", MODEL))
    member = Member(spec, connect(spec, session, sim.base_url, Secret(KEY)), 0.01, 1.0)
    return Pool([member], 2, **options)


def test_the_pool_declares_a_provider_down_after_max_outage(sim: Simulator) -> None:
    sim.config.outage_s = 3600.0  # 503 for everything
    events: list[tuple[EventKind, str, str]] = []

    async def go() -> NoProviderLeft:
        async with aiohttp.ClientSession() as session:
            pool = pool_of(sim, session, max_outage_s=0.5, on_event=lambda *e: events.append(e))
            for n in range(100):
                try:
                    await pool.generate(item(n), lambda: True)
                except NoProviderLeft as exc:
                    return exc
                except Exception:  # noqa: S112 (each failed attempt: the next item)
                    continue
        raise AssertionError("never declared down")

    left = asyncio.run(go())
    assert left.temporary and "down: no success for" in str(left)
    assert [kind for kind, _, _ in events].count(EventKind.PROVIDER_DISABLED) == 1
    assert sim.stats.faults["outage"] >= 1 and sim.stats.generations == 0


def test_the_pool_blames_the_provider_for_the_same_error_in_a_row(sim: Simulator) -> None:
    verdicts: list[tuple[str, bool]] = []

    async def go() -> tuple[int, NoProviderLeft | None]:
        suspects = 0
        async with aiohttp.ClientSession() as session:
            pool = pool_of(sim, session, model="no-such-model", on_verdict=lambda *v: verdicts.append(v))
            for n in range(SAME_ERROR_STOP + 2):
                try:
                    await pool.generate(item(n), lambda: True)
                except Suspect:
                    suspects += 1
                except NoProviderLeft as exc:
                    return suspects, exc
        return suspects, None

    suspects, left = asyncio.run(go())
    assert suspects == SAME_ERROR_STOP - 1 and left is not None and not left.temporary
    assert verdicts == [("relay", True)]  # the provider's fault: its items stay resumable
    assert sim.stats.requests == SAME_ERROR_STOP


def test_a_run_from_a_plan_without_the_cli(tmp_path: Path, sim: Simulator) -> None:
    path = write_manifest(tmp_path, [{"id": "p", "prompt": "a fjord", "count": 5}])
    plan = RunPlan.resolve(path, load_manifest(path), RunRequest(simulate=True))
    assert plan.mode == "online" and plan.endpoints == []  # the simulator's are made at start
    events: list[Event] = []
    summary = asyncio.run(execute(plan, events.append))
    assert summary.exit_code == 0 and summary.done == 5
    assert sum(e.kind is EventKind.DONE for e in events) == 5 and len(metadata(tmp_path / "out")) == 5
    again = asyncio.run(execute(RunPlan.resolve(path, load_manifest(path), RunRequest(simulate=True))))
    assert again.skipped == 5 and again.requests == 0


def test_a_plan_resolves_keys_from_the_environment_it_is_given(tmp_path: Path, sim: Simulator) -> None:
    path = write_manifest(tmp_path, [{"prompt": "a fjord"}])
    environ = {"IMAGE_API_KEY": KEY, "IMAGE_API_BASE_URL": sim.base_url}
    plan = RunPlan.resolve(path, load_manifest(path, Keys(environ)), RunRequest(), environ)
    [endpoint] = plan.endpoints
    assert (endpoint.spec.name, endpoint.base_url, endpoint.key.reveal()) == ("default", sim.base_url, KEY)
    assert KEY not in repr(plan.endpoints)
    assert asyncio.run(execute(plan)).done == 1


@pytest.mark.usefixtures("gemini_key")
def test_batch_reports_done_only_once_durable_and_warns_on_sizes(tmp_path: Path, sim: Simulator) -> None:
    sim.config.ignore_aspect_ratio = True  # a relay that answers 1:1 whatever is asked
    providers = [{"name": "g", "protocol": "gemini", "mode": "batch", "base_url": sim.origin}]
    jobs = [{"id": "b{n}", "prompt": "a dune {n}", "aspect_ratio": "16:9", "matrix": {"n": list(range(40))}}]
    path = write_manifest(tmp_path, jobs, providers=providers, batch={"poll_interval_s": 0.05})
    plan = RunPlan.resolve(path, load_manifest(path), RunRequest(), {"GEMINI_API_KEY": KEY})
    seen: list[tuple[Event, str | None]] = []
    db = tmp_path / "out" / "state.db"
    summary = asyncio.run(
        execute(plan, lambda e: seen.append((e, status_in_db(db, e.item) if e.item else None)))
    )
    assert summary.exit_code == 0 and summary.done == 40
    done = [status for e, status in seen if e.kind is EventKind.DONE]
    assert done == ["done"] * 40  # each committed before it was reported
    warnings = [e.message for e, _ in seen if e.kind is EventKind.WARNING]
    assert len(warnings) == 1 and summary.warnings == 1 and summary.size_mismatches == {"g": 40}  # once
    assert warnings[0].startswith("got 1024x1024, asked 16:9 (1344x768): g may ignore the asked size")
    assert all(row["aspect_ratio_mismatch"] for row in metadata(tmp_path / "out"))


@pytest.fixture
def gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
