"""The state backends against the real thing: SQLite in a folder, PostgreSQL on a throwaway server.

One contract for both (what a single worker sees), then what only a shared state does: items enter
once, claims exclude each other, a lease that ran out is taken over and fences the old holder's
writes, and the shares of a limit never add up to more than the limit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import LeaseLost, ManifestError, StorageError
from pipeline.item import Item
from pipeline.state import State, open_state
from pipeline.state.postgres import PostgresState

OUTPUT = "s3://bucket/out"


def items(n: int, prompt: str = "p") -> list[Item]:
    return [Item("job", i, f"{prompt} {i}", "1:1", "m", f"fp-{prompt}-{i}") for i in range(n)]


def metadata(item: Item) -> dict[str, object]:
    return {
        "file_name": f"images/{item.name}.png",
        "sha256": "0" * 64,
        "id": item.id,
        "index": item.index,
        "model": item.model,
        "served_model": "served-m",
    }


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    if request.param == "sqlite":
        opened = open_state(None, str(tmp_path), tmp_path)
    else:
        opened = open_state(request.getfixturevalue("pg_url"), OUTPUT, None)
        opened.seed(lambda: items(3), "digest")
        opened.claim([(item, None) for item in items(3)])
    with opened:
        yield opened


def test_both_backends_record_and_read_back_the_same(state: State) -> None:
    a, b, c = items(3)
    state.begin()
    run = state.start_run()
    state.record_generated(a, "https://img/a", 1, "default")
    state.record_done(b, metadata(b))
    state.record_failed(c, "refused", "no", 2)
    state.end_run(run, 1, {"done": 1})
    state.commit()
    row = state.get(a)
    assert row is not None and (row.status, row.url, row.attempts, row.provider) == (
        "url",
        "https://img/a",
        1,
        "default",
    )
    assert [json.loads(line)["file_name"] for line in state.images()] == ["images/job_1.png"]
    assert [f["error_type"] for f in state.failures()] == ["refused"]
    counts = state.counts()
    assert (counts["done"], counts["failed"], counts["in_progress"]) == (1, 1, 1)
    assert state.done_by_model() == {"served-m": 1}  # read from the image's metadata, on both backends
    last = state.last_run()
    assert last is not None and last["exit_code"] == 1 and last["summary"] == {"done": 1}


def test_items_enter_once_and_a_claimed_item_goes_to_one_worker(pg_url: str) -> None:
    with PostgresState(pg_url, OUTPUT) as one, PostgresState(pg_url, OUTPUT) as two:
        batch = items(10)
        assert one.seed(lambda: batch, "d1") is True
        assert two.seed(lambda: batch, "d1") is False  # already in: the second worker enters nothing
        assert one.count_rows() == 10 and all(
            row is not None and row.status == "new" for row in two.rows(batch)
        )
        first = one.claim([(item, None) for item in batch[:6]])
        second = two.claim([(item, None) for item in batch])
        assert [i.index for i, _ in first] == [0, 1, 2, 3, 4, 5]
        assert [i.index for i, _ in second] == [6, 7, 8, 9]
        one.release([batch[0]])
        assert [i.index for i, _ in two.claim([(batch[0], None)])] == [0]


def test_a_lease_that_ran_out_is_taken_over_and_fences_the_old_holder(pg_url: str) -> None:
    with PostgresState(pg_url, OUTPUT, lease_s=0.3) as slow, PostgresState(pg_url, OUTPUT) as other:
        item = items(1)[0]
        slow.seed(lambda: [item], "d")
        assert slow.claim([(item, None)]) and slow.holds(item)
        slow.record_generated(item, "https://img/paid", 1, "default")
        slow.commit()
        assert other.claim([(item, None)]) == []  # held
        time.sleep(0.5)
        assert not slow.holds(item)
        [(taken, row)] = other.claim([(item, None)])
        assert row is not None and row.url == "https://img/paid"  # the paid URL, downloaded not bought again
        with pytest.raises(LeaseLost):
            slow.record_done(item, metadata(item))
        slow.commit()
        other.record_done(taken, metadata(taken))
        other.commit()
        done = slow.get(item)
        assert done is not None and done.status == "done"


def test_shares_never_add_up_to_more_than_the_limit(pg_url: str) -> None:
    limits = {"": 7, "p": 7}
    workers = [PostgresState(pg_url, OUTPUT, lease_s=2.0) for _ in range(3)]
    try:
        first = workers[0]
        first.register()
        assert first.heartbeat(limits, {}) == ({"": 7, "p": 7}, 1)  # alone: all of it
        for worker in workers[1:]:
            worker.register()
        # The newcomers get what the first left free: nothing yet, as it may have 7 in flight.
        assert workers[1].heartbeat(limits, {})[0]["p"] == 0
        in_flight = {id(w): 0 for w in workers}
        in_flight[id(first)] = 7
        for _ in range(4):  # rounds of heartbeats, the first draining to its new share
            for worker in workers:
                shares, count = worker.heartbeat(limits, {"p": in_flight[id(worker)]})
                assert count == 3
                in_flight[id(worker)] = min(in_flight[id(worker)], shares["p"])
                published = [json.loads(s) for (s,) in first._x("SELECT shares FROM workers").fetchall()]
                first.commit()
                assert sum(p.get("p", 0) for p in published) <= 7
        assert sorted(w.heartbeat(limits, {})[0]["p"] for w in workers) == [2, 2, 3]
        workers[2].retire()
        assert sorted(w.heartbeat(limits, {})[0]["p"] for w in workers[:2]) == [3, 4]
    finally:
        for worker in workers:
            worker.close()


def test_one_database_holds_one_output(pg_url: str) -> None:
    PostgresState(pg_url, OUTPUT).close()
    with pytest.raises(ManifestError, match="holds the output s3://bucket/out, not s3://other"):
        PostgresState(pg_url, "s3://other")


def test_a_password_in_the_state_url_is_refused_without_repeating_it() -> None:
    with pytest.raises(ManifestError) as caught:
        open_state("postgresql://u:hunter2@127.0.0.1/db", OUTPUT, None)
    assert "PGPASSWORD" in str(caught.value.problems) and "hunter2" not in str(caught.value.problems)


def test_the_password_comes_from_pgpass_when_pgpassword_is_unset(
    pg_url: str, _postgres: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD")
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="password"):
        PostgresState(pg_url, OUTPUT)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{_postgres.port}:*:pipeline:{_postgres.password}\n")
    pgpass.chmod(0o600)  # libpq ignores a password file others can read
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    with PostgresState(pg_url, OUTPUT) as state:
        assert state.count_rows() == 0
