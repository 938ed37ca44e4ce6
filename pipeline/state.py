"""The state store: one SQLite database (WAL) per output folder, the single source of truth.

One row per item `(id, idx)`. `fp` is the fingerprint of the work the row is about now; `image` is the
metadata of the file on disk (JSON, exactly the metadata.jsonl row) and `image_fp` the fingerprint it
was made from, so a prompt edit keeps the old image recorded until its replacement lands.

    status  url      generated; `url` (NULL for an inline image) awaits download since `url_at`
            done     `image` is the current image
            failed   `error_type` and `message` say why
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.manifest import Item

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT NOT NULL, idx INTEGER NOT NULL, fp TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, url TEXT, url_at REAL,
    error_type TEXT, message TEXT, prompt TEXT NOT NULL,
    image TEXT, image_fp TEXT, file TEXT, updated_at REAL NOT NULL, provider TEXT,
    PRIMARY KEY (id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    display_name TEXT PRIMARY KEY, provider TEXT NOT NULL, name TEXT, stage TEXT NOT NULL,
    remote_state TEXT, input_file TEXT, results_file TEXT, items INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    display_name TEXT NOT NULL, id TEXT NOT NULL, idx INTEGER NOT NULL, fp TEXT NOT NULL,
    PRIMARY KEY (display_name, id, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_items_by_item ON batch_items (id, idx);
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL, exit_code INTEGER,
    summary TEXT
);
"""


@dataclass(frozen=True, slots=True)
class Row:
    fp: str
    status: str
    attempts: int
    url: str | None
    url_at: float | None
    error_type: str | None
    image_fp: str | None
    file: str | None  # the image's path relative to the output folder
    provider: str | None  # who generated the recorded URL or image


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


class BatchStore:
    """The batch jobs of an output, in the same database as its items (a mixin of `State`)."""

    _db: sqlite3.Connection
    _has_batches: bool

    def add_batch(self, display_name: str, provider: str, items: list[Item]) -> None:
        """Record a job and the items it holds, before anything is sent: a crash leaves it findable."""
        now = time.time()
        self._db.execute(
            "INSERT INTO batches (display_name, provider, stage, items, created_at, updated_at)"
            " VALUES (?, ?, 'creating', ?, ?, ?)",
            (display_name, provider, len(items), now, now),
        )
        self._db.executemany(
            "INSERT INTO batch_items VALUES (?, ?, ?, ?)",
            ((display_name, item.id, item.index, item.fingerprint) for item in items),
        )

    def update_batch(self, display_name: str, **fields: Any) -> None:
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(
            f"UPDATE batches SET {sets} WHERE display_name = ?",  # noqa: S608 (column names from code)
            (*fields.values(), display_name),
        )

    def batches(self, stages: tuple[str, ...] | None = None) -> list[BatchRow]:
        query = (
            "SELECT display_name, provider, name, stage, remote_state, input_file, results_file, items,"
            " done, failed, created_at FROM batches"
        )
        if stages:
            query += f" WHERE stage IN ({', '.join('?' * len(stages))})"
        return [BatchRow(*row) for row in self._db.execute(query + " ORDER BY created_at", stages or ())]

    def batch_jobs(self) -> list[dict[str, Any]]:
        """The jobs for `pipeline status`: name, state, items, done, failed, age."""
        if not self._has_batches:
            return []  # a state written before batch mode existed, read as it is
        now = time.time()
        return [
            {"display_name": b.display_name, "name": b.name, "provider": b.provider, "stage": b.stage,
             "remote_state": b.remote_state, "items": b.items, "done": b.done, "failed": b.failed,
             "age_s": round(now - b.created_at)}
            for b in self.batches()
        ]  # fmt: skip

    def batch_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM batches").fetchone()[0])

    def batch_members(self, display_name: str) -> dict[str, tuple[str, int, str]]:
        """key (the item's name) -> (id, index, fingerprint) of a job's items."""
        rows = self._db.execute("SELECT id, idx, fp FROM batch_items WHERE display_name = ?", (display_name,))
        return {f"{ident}_{idx}": (ident, idx, fp) for ident, idx, fp in rows}

    def in_open_batch(self, item: Item) -> bool:
        """Whether the item is held by a job not yet collected or ended: it goes into no other."""
        if not self._has_batches:
            return False
        found = self._db.execute(
            "SELECT 1 FROM batch_items JOIN batches USING (display_name)"
            " WHERE id = ? AND idx = ? AND stage IN (?, ?) LIMIT 1",
            (item.id, item.index, *OPEN_STAGES),
        ).fetchone()
        return found is not None


class State(BatchStore):
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self._provider = "provider"
        if readonly:
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            if not any(row[1] == "provider" for row in self._db.execute("PRAGMA table_info(items)")):
                self._provider = "NULL"  # a state written before providers existed, read as it is
            self._has_batches = bool(
                self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'batch_items'").fetchone()
            )
            return
        self._has_batches = True
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        if "provider" not in columns:  # a state written before providers existed
            self._db.execute("ALTER TABLE items ADD COLUMN provider TEXT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Many writes, one commit."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def count_rows(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM items").fetchone()[0])

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        finally:
            self._db.close()

    def begin(self) -> None:
        """From now on writes accumulate until `commit()`: one commit makes many writes durable."""
        self._db.execute("BEGIN")

    def commit(self) -> None:
        """Make every write so far durable, and keep batching."""
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def get(self, item: Item) -> Row | None:
        found = self._db.execute(
            "SELECT fp, status, attempts, url, url_at, error_type, image_fp, file, "  # noqa: S608 (a column name)
            f"{self._provider} FROM items WHERE id = ? AND idx = ?",
            (item.id, item.index),
        ).fetchone()
        return Row(*found) if found else None

    def image_sha256(self, item: Item) -> str | None:
        found = self._db.execute(
            "SELECT image FROM items WHERE id = ? AND idx = ?", (item.id, item.index)
        ).fetchone()
        return json.loads(found[0])["sha256"] if found and found[0] else None

    def _upsert(self, item: Item, **fields: Any) -> None:
        fields |= {"fp": item.fingerprint, "prompt": item.prompt, "updated_at": time.time()}
        names = ", ".join(fields)
        updates = ", ".join(f"{name} = excluded.{name}" for name in fields)
        self._db.execute(
            f"INSERT INTO items (id, idx, {names}) VALUES (?, ?{', ?' * len(fields)})"  # noqa: S608
            f" ON CONFLICT (id, idx) DO UPDATE SET {updates}",
            (item.id, item.index, *fields.values()),
        )

    def record_generated(self, item: Item, url: str | None, attempts: int, provider: str) -> None:
        self._upsert(
            item, status="url", url=url, url_at=time.time(), attempts=attempts,
            error_type=None, message=None, provider=provider,
        )  # fmt: skip

    def record_done(self, item: Item, metadata: dict[str, Any]) -> None:
        self._upsert(
            item, status="done", url=None, url_at=None, error_type=None, message=None,
            image=json.dumps(metadata, ensure_ascii=False), image_fp=item.fingerprint,
            file=metadata["file_name"],
        )  # fmt: skip

    def record_failed(self, item: Item, error_type: str, message: str, attempts: int) -> None:
        self._upsert(
            item, status="failed", url=None, url_at=None, attempts=attempts,
            error_type=error_type, message=message,
        )  # fmt: skip

    def images(self) -> Iterator[str]:
        """The metadata.jsonl rows: one JSON object per image on disk."""
        for (image,) in self._db.execute("SELECT image FROM items WHERE image IS NOT NULL ORDER BY id, idx"):
            yield image

    def failures(self) -> Iterator[dict[str, Any]]:
        cursor = self._db.execute(
            "SELECT id, idx, prompt, error_type, message, attempts FROM items"
            " WHERE status = 'failed' ORDER BY id, idx"
        )
        for ident, idx, prompt, error_type, message, attempts in cursor:
            yield {
                "id": ident, "index": idx, "prompt": prompt, "error_type": error_type,
                "message": message, "attempts": attempts,
            }  # fmt: skip

    def counts(self) -> dict[str, Any]:
        """Items by status (and failed items by reason), for `pipeline status`."""
        by_status = dict(self._db.execute("SELECT status, count(*) FROM items GROUP BY status"))
        reasons = dict(
            self._db.execute("SELECT error_type, count(*) FROM items WHERE status = 'failed' GROUP BY 1")
        )
        return {
            "items": sum(by_status.values()),
            "done": by_status.get("done", 0),
            "failed": by_status.get("failed", 0),
            "in_progress": by_status.get("url", 0),
            "failed_by_reason": reasons,
        }

    def last_run(self) -> dict[str, Any] | None:
        found = self._db.execute(
            "SELECT run, started_at, ended_at, exit_code, summary FROM runs ORDER BY run DESC LIMIT 1"
        ).fetchone()
        if not found:
            return None
        run, started, ended, code, summary = found
        return {
            "run": run, "started_at": _iso(started), "ended_at": _iso(ended), "exit_code": code,
            "summary": json.loads(summary) if summary else None,
        }  # fmt: skip

    def start_run(self) -> int:
        cursor = self._db.execute("INSERT INTO runs (started_at) VALUES (?)", (time.time(),))
        return int(cursor.lastrowid or 0)

    def end_run(self, run: int, exit_code: int, summary: dict[str, Any]) -> None:
        self._db.execute(
            "UPDATE runs SET ended_at = ?, exit_code = ?, summary = ? WHERE run = ?",
            (time.time(), exit_code, json.dumps(summary), run),
        )


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
