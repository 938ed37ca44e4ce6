"""The state's SQL, shared by its backends: one row per item `(id, idx)`, the batch jobs, the runs.

`fp` is the fingerprint of the work the row is about now; `image` is the metadata of the stored file
(JSON, exactly the metadata.jsonl row) and `image_fp` the fingerprint it was made from, so a prompt
edit keeps the old image recorded until its replacement lands.

    status  new      entered by a worker for the others to claim (shared states only)
            url      generated; `url` (NULL for an inline image) awaits download since `url_at`
            done     `image` is the current image
            failed   `error_type` and `message` say why

Queries are written once with `?` placeholders; a backend turns them into its own (`_q`). What only
a shared state does (leases, workers, shares of the limits) is a no-op here: one worker under the
output's lock holds every item.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.item import Item, Status


@dataclass(frozen=True, slots=True)
class Row:
    fp: str
    status: str
    attempts: int
    url: str | None
    url_at: float | None
    error_type: str | None
    image_fp: str | None
    file: str | None  # the image's path relative to the output
    provider: str | None  # who generated the recorded URL or image


ROW = "fp, status, attempts, url, url_at, error_type, image_fp, file, provider"
OPEN_STAGES = ("creating", "active")  # a job recorded before its create, and one the provider has


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A batch job: `stage` is ours (creating, active, collected, ended), `remote_state` the provider's."""

    display_name: str
    provider: str
    name: str | None
    stage: str
    remote_state: str | None
    input_file: str | None
    results_file: str | None
    items: int
    done: int
    failed: int
    created_at: float


class State:
    """The interface every backend has, with the SQL they share."""

    shared = False  # many workers at once (leases, shares of the limits), or one under the output's lock
    heartbeat_s = 1.0  # how often a shared state's worker renews its leases and shares
    _db: Any  # a DB-API connection whose `execute` returns an iterable cursor
    _has_batches = True
    _provider = "provider"  # the column, or NULL for a state written before providers existed

    def _q(self, query: str) -> str:
        return query

    def _field(self, name: str) -> str:
        """A field of the recorded image's metadata (a JSON text), in SQL (`name` is ours, not input)."""
        return f"json_extract(image, '$.{name}')"

    def _x(self, query: str, params: Iterable[Any] = ()) -> Any:
        return self._db.execute(self._q(query), tuple(params))

    def _stream(self, query: str, params: Iterable[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """Rows one at a time, for results that may not fit in memory."""
        yield from self._x(query, params)

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        """From now on writes accumulate until `commit()`: one commit makes many writes durable."""

    def commit(self) -> None:
        """Make every write so far durable, and keep batching."""
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Many writes, one commit."""
        try:
            yield
        except BaseException:
            self._db.rollback()
            raise
        self._db.commit()

    def exclusive(self) -> AbstractContextManager[None]:
        """Held while the dataset files are rewritten, so the last writer writes the newest state."""
        return nullcontext()

    # -- items

    def count_rows(self) -> int:
        return int(self._x("SELECT count(*) FROM items").fetchone()[0])

    def get(self, item: Item) -> Row | None:
        found = self._x(
            f"SELECT {ROW.replace('provider', self._provider)} FROM items WHERE id = ? AND idx = ?",
            (item.id, item.index),
        ).fetchone()
        return Row(*found) if found else None

    def seed(self, items: Callable[[], Iterable[Item]], digest: str) -> bool:
        """Enter the manifest's items for the workers to claim, once per `digest` of them (a shared
        state; whether this call entered them)."""
        return False

    def rows(self, items: list[Item]) -> list[Row | None]:
        return [self.get(item) for item in items]

    def claim(self, pairs: list[tuple[Item, Row | None]]) -> list[tuple[Item, Row | None]]:
        """Of the items (with the rows they were decided on), those this worker may work on now, each
        with its row as it is now: all of them, as they are, when the worker is alone."""
        return pairs

    def release(self, items: list[Item]) -> None:
        """Give claimed items back (they needed nothing after all)."""

    def holds(self, item: Item) -> bool:
        """Whether this worker still holds the item (checked right before its image is stored)."""
        return True

    def image_sha256(self, item: Item) -> str | None:
        found = self._x("SELECT image FROM items WHERE id = ? AND idx = ?", (item.id, item.index)).fetchone()
        return json.loads(found[0])["sha256"] if found and found[0] else None

    def _write(self, item: Item, fields: dict[str, Any]) -> None:
        fields |= {"fp": item.fingerprint, "prompt": item.prompt, "updated_at": time.time()}
        names = ", ".join(fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)
        self._x(
            f"INSERT INTO items (id, idx, {names}) VALUES (?, ?{', ?' * len(fields)})"
            f" ON CONFLICT (id, idx) DO UPDATE SET {updates}",
            (item.id, item.index, *fields.values()),
        )

    def record_generated(self, item: Item, url: str | None, attempts: int, provider: str) -> None:
        self._write(
            item,
            {
                "status": Status.URL,
                "url": url,
                "url_at": time.time(),
                "attempts": attempts,
                "error_type": None,
                "message": None,
                "provider": provider,
            },
        )

    def record_done(self, item: Item, metadata: dict[str, Any]) -> None:
        self._write(
            item,
            {
                "status": Status.DONE,
                "url": None,
                "url_at": None,
                "error_type": None,
                "message": None,
                "image": json.dumps(metadata, ensure_ascii=False),
                "image_fp": item.fingerprint,
                "file": metadata["file_name"],
            },
        )

    def record_failed(self, item: Item, error_type: str, message: str, attempts: int) -> None:
        self._write(
            item,
            {
                "status": Status.FAILED,
                "url": None,
                "url_at": None,
                "attempts": attempts,
                "error_type": error_type,
                "message": message,
            },
        )

    def images(self) -> Iterator[str]:
        """The metadata.jsonl rows: one JSON object per stored image."""
        for (image,) in self._stream("SELECT image FROM items WHERE image IS NOT NULL ORDER BY id, idx"):
            yield image

    def failures(self) -> Iterator[dict[str, Any]]:
        rows = self._stream(
            "SELECT id, idx, prompt, error_type, message, attempts FROM items"
            " WHERE status = 'failed' ORDER BY id, idx"
        )
        for ident, idx, prompt, error_type, message, attempts in rows:
            yield {
                "id": ident,
                "index": idx,
                "prompt": prompt,
                "error_type": error_type,
                "message": message,
                "attempts": attempts,
            }

    def counts(self) -> dict[str, Any]:
        """Items by status (and failed items by reason), for `pipeline status`."""
        by_status = dict(self._x("SELECT status, count(*) FROM items GROUP BY status").fetchall())
        reasons = dict(
            self._x("SELECT error_type, count(*) FROM items WHERE status = 'failed' GROUP BY 1").fetchall()
        )
        return {
            "items": sum(by_status.values()),
            "done": by_status.get(Status.DONE, 0),
            "failed": by_status.get(Status.FAILED, 0),
            "in_progress": by_status.get(Status.URL, 0),
            "pending": by_status.get(Status.NEW, 0),
            "failed_by_reason": reasons,
        }

    def done_by_model(self) -> dict[str, int]:
        """Images by the model that made them: the served model where the reply named one. It reads
        every image's metadata: for `status` and the report, not for a progress bar's polls."""
        model = f"coalesce({self._field('served_model')}, {self._field('model')})"
        query = f"SELECT {model}, count(*) FROM items WHERE status = 'done' GROUP BY 1"
        return dict(self._x(query).fetchall())

    # -- workers (one, here)

    def register(self) -> None:
        """Join the workers of this output (a shared state)."""

    def heartbeat(
        self, limits: Mapping[str, int], in_flight: Mapping[str, int]
    ) -> tuple[dict[str, int], int]:
        """Renew this worker's leases and take its share of each limit (all of it, when it is alone);
        with the number of live workers."""
        return dict(limits), 1

    def retire(self) -> None:
        """Leave: give back every lease and share."""

    def workers(self) -> list[dict[str, Any]]:
        """The live workers, for `pipeline status`."""
        return []

    # -- runs

    def last_run(self) -> dict[str, Any] | None:
        found = self._x(
            "SELECT run, started_at, ended_at, exit_code, summary FROM runs ORDER BY run DESC LIMIT 1"
        ).fetchone()
        if not found:
            return None
        run, started, ended, code, summary = found
        return {
            "run": run,
            "started_at": _iso(started),
            "ended_at": _iso(ended),
            "exit_code": code,
            "summary": json.loads(summary) if summary else None,
        }

    def start_run(self) -> int:
        return int(
            self._x("INSERT INTO runs (started_at) VALUES (?) RETURNING run", (time.time(),)).fetchone()[0]
        )

    def end_run(self, run: int, exit_code: int, summary: dict[str, Any]) -> None:
        self._x(
            "UPDATE runs SET ended_at = ?, exit_code = ?, summary = ? WHERE run = ?",
            (time.time(), exit_code, json.dumps(summary), run),
        )

    # -- batch jobs

    def add_batch(self, display_name: str, provider: str, items: list[Item]) -> None:
        """Record a job and the items it holds, before anything is sent: a crash leaves it findable."""
        now = time.time()
        self._x(
            "INSERT INTO batches (display_name, provider, stage, items, created_at, updated_at)"
            " VALUES (?, ?, 'creating', ?, ?, ?)",
            (display_name, provider, len(items), now, now),
        )
        self._db.executemany(
            self._q("INSERT INTO batch_items VALUES (?, ?, ?, ?)"),
            [(display_name, item.id, item.index, item.fingerprint) for item in items],
        )

    def update_batch(self, display_name: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._x(
            f"UPDATE batches SET {sets} WHERE display_name = ?",
            (*fields.values(), display_name),
        )

    def batches(self, stages: tuple[str, ...] | None = None) -> list[BatchRow]:
        query = (
            "SELECT display_name, provider, name, stage, remote_state, input_file, results_file, items,"
            " done, failed, created_at FROM batches"
        )
        if stages:
            query += f" WHERE stage IN ({', '.join('?' * len(stages))})"
        return [BatchRow(*row) for row in self._x(query + " ORDER BY created_at", stages or ()).fetchall()]

    def batch_jobs(self) -> list[dict[str, Any]]:
        """The jobs for `pipeline status`: name, state, items, done, failed, age."""
        if not self._has_batches:
            return []  # a state written before batch mode existed, read as it is
        now = time.time()
        return [
            {
                "display_name": b.display_name,
                "name": b.name,
                "provider": b.provider,
                "stage": b.stage,
                "remote_state": b.remote_state,
                "items": b.items,
                "done": b.done,
                "failed": b.failed,
                "age_s": round(now - b.created_at),
            }
            for b in self.batches()
        ]

    def batch_count(self) -> int:
        return int(self._x("SELECT count(*) FROM batches").fetchone()[0])

    def batch_members(self, display_name: str) -> dict[str, tuple[str, int, str]]:
        """key (the item's name) -> (id, index, fingerprint) of a job's items."""
        rows = self._x("SELECT id, idx, fp FROM batch_items WHERE display_name = ?", (display_name,))
        return {f"{ident}_{idx}": (ident, idx, fp) for ident, idx, fp in rows.fetchall()}

    def in_open_batch(self, item: Item) -> bool:
        """Whether the item is held by a job not yet collected or ended: it goes into no other."""
        if not self._has_batches:
            return False
        found = self._x(
            "SELECT 1 FROM batch_items JOIN batches USING (display_name)"
            " WHERE id = ? AND idx = ? AND stage IN (?, ?) LIMIT 1",
            (item.id, item.index, *OPEN_STAGES),
        ).fetchone()
        return found is not None


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
