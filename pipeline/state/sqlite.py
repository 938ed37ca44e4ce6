"""The default state: one SQLite database (WAL) in the output folder, for the one worker that holds
the folder's lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.state.base import State

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


class SqliteState(State):
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            if not any(row[1] == "provider" for row in self._db.execute("PRAGMA table_info(items)")):
                self._provider = "NULL"  # a state written before providers existed, read as it is
            self._has_batches = bool(
                self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'batch_items'").fetchone()
            )
            return
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(items)")}
        if "provider" not in columns:  # a state written before providers existed
            self._db.execute("ALTER TABLE items ADD COLUMN provider TEXT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("COMMIT")
        finally:
            self._db.close()

    def begin(self) -> None:
        self._db.execute("BEGIN")

    def commit(self) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        self._db.execute("BEGIN")
