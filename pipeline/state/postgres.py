"""A shared state in PostgreSQL: many workers, on any machines, on one output.

Connection settings are libpq's own (psycopg 3 wraps libpq): the URL names host, port, user and
database; the password comes from `PGPASSWORD`, `~/.pgpass` or a service file, never from the URL.
One database (or one schema, via `?options=-csearch_path%3D...`) holds one output's state; it
records which output, and refuses another.

Items enter once (`seed`: whichever worker comes first, under an advisory lock; the others wait for
it). A worker claims items under a lease (`FOR UPDATE SKIP LOCKED`: never one another worker holds)
that its heartbeat renews; every write is fenced by the lease (`... AND lease_owner = me`), so a
worker whose lease ran out and was taken over records nothing more for that item (`LeaseLost`).
Times that compare across machines (leases, heartbeats) are the server's clock.

Shares of a limit: at each heartbeat, under one advisory lock, a worker counts the live workers,
takes its share of each limit (limit // n, the first limit % n by start time take one more) and
never more than the limit less what the others published; it publishes what it may use (or what it
still has in flight, if more). A newcomer starts at what the others left free and gets its full
share as they shrink theirs at their next heartbeat: the sum stays within the limit throughout.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg

from pipeline.errors import LeaseLost, ManifestError, StorageError
from pipeline.item import Item, Status
from pipeline.state.base import ROW, Row, State

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT NOT NULL, idx INTEGER NOT NULL, fp TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, url TEXT, url_at DOUBLE PRECISION,
    error_type TEXT, message TEXT, prompt TEXT NOT NULL,
    image TEXT, image_fp TEXT, file TEXT, updated_at DOUBLE PRECISION NOT NULL, provider TEXT,
    lease_owner TEXT, lease_until DOUBLE PRECISION,
    PRIMARY KEY (id, idx)
);
CREATE INDEX IF NOT EXISTS items_by_lease ON items (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (
    display_name TEXT PRIMARY KEY, provider TEXT NOT NULL, name TEXT, stage TEXT NOT NULL,
    remote_state TEXT, input_file TEXT, results_file TEXT, items INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    display_name TEXT NOT NULL, id TEXT NOT NULL, idx INTEGER NOT NULL, fp TEXT NOT NULL,
    PRIMARY KEY (display_name, id, idx)
);
CREATE TABLE IF NOT EXISTS runs (
    run BIGSERIAL PRIMARY KEY, started_at DOUBLE PRECISION NOT NULL, ended_at DOUBLE PRECISION,
    exit_code INTEGER, summary TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    worker TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL, heartbeat_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION, shares TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
NOW = "extract(epoch from clock_timestamp())::float8"
SCHEMA_LOCK, SEED_LOCK, SHARES_LOCK, DATASET_LOCK = 7_100_001, 7_100_002, 7_100_003, 7_100_004
CURSOR_ROWS = 2000  # rows a server-side cursor fetches at a time


class PostgresState(State):
    shared = True

    def __init__(self, url: str, output: str, *, readonly: bool = False, lease_s: float = 120.0) -> None:
        self.worker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s
        self.heartbeat_s = min(1.0, lease_s / 8)
        self.live_s = min(lease_s, 10.0)  # a worker silent this long is counted out of the shares
        try:
            self._db = psycopg.connect(url, application_name="imagegen-pipeline", connect_timeout=10)
        except psycopg.Error as exc:
            raise StorageError(f"state {url}: {exc}") from exc
        try:
            with self._database():
                self._open(output, readonly)
        except BaseException:
            self._db.close()
            raise

    @contextmanager
    def _database(self) -> Iterator[None]:
        """psycopg's errors become ours (the run stops, exit 74): callers need not know the driver."""
        try:
            yield
        except psycopg.Error as exc:
            raise StorageError(f"state {_where(self._db)}: {exc}") from exc

    def _open(self, output: str, readonly: bool) -> None:
        if readonly:
            if self._x("SELECT to_regclass('meta')").fetchone()[0] is None:
                raise ManifestError([f"state {_where(self._db)}: no pipeline state here yet (never ran)"])
            self._check_output(output, create=False)
            self._db.rollback()
            return
        with self.transaction():
            self._x("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
            self._db.execute(SCHEMA)
            self._check_output(output, create=True)

    def _q(self, query: str) -> str:
        return query.replace("?", "%s")

    def _field(self, name: str) -> str:
        return f"(image::json ->> '{name}')"

    def _x(self, query: str, params: Iterable[Any] = ()) -> Any:
        with self._database():
            return super()._x(query, params)

    def _check_output(self, output: str, create: bool) -> None:
        found = self._x("SELECT value FROM meta WHERE key = 'output'").fetchone()
        if found is None and create:
            self._x("INSERT INTO meta VALUES ('output', ?)", (output,))
        elif found is not None and found[0] != output:
            raise ManifestError(
                [
                    f"state {_where(self._db)}: holds the output {found[0]}, not {output}"
                    " (use one database, or schema, per output)"
                ]
            )

    def _stream(self, query: str, params: Iterable[Any] = ()) -> Iterator[tuple[Any, ...]]:
        with self._database(), self._db.cursor(name=f"stream_{uuid.uuid4().hex[:8]}") as cursor:
            cursor.itersize = CURSOR_ROWS
            cursor.execute(self._q(query), tuple(params))
            yield from cursor

    def close(self) -> None:
        try:
            if not self._db.closed:
                self.commit()
        finally:
            self._db.close()

    def commit(self) -> None:
        with self._database():
            self._db.commit()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._database(), super().transaction():
            yield

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.commit()
        self._x("SELECT pg_advisory_lock(?)", (DATASET_LOCK,))
        try:
            yield
        finally:
            self._x("SELECT pg_advisory_unlock(?)", (DATASET_LOCK,))
            self.commit()

    # -- items

    def seed(self, items: Callable[[], Iterable[Item]], digest: str) -> bool:
        """Enter the manifest's items (once: True for the worker that did). The others wait here."""
        with self.transaction():
            self._x("SELECT pg_advisory_xact_lock(?)", (SEED_LOCK,))
            found = self._x("SELECT value FROM meta WHERE key = 'seeded'").fetchone()
            if found and found[0] == digest:
                return False
            self._db.execute(
                "CREATE TEMP TABLE seed (id TEXT, idx INTEGER, fp TEXT, prompt TEXT) ON COMMIT DROP"
            )
            with self._db.cursor() as cursor, cursor.copy("COPY seed FROM STDIN") as copy:
                for item in items():
                    copy.write_row((item.id, item.index, item.fingerprint, item.prompt))
            self._x(
                "INSERT INTO items (id, idx, fp, status, prompt, updated_at)"
                f" SELECT id, idx, fp, 'new', prompt, {NOW} FROM seed ON CONFLICT DO NOTHING"
            )
            self._x(
                "INSERT INTO meta VALUES ('seeded', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (digest,),
            )
        return True

    def rows(self, items: list[Item]) -> list[Row | None]:
        found = {
            (ident, idx): Row(*row)
            for ident, idx, *row in self._x(
                f"SELECT id, idx, {ROW} FROM items JOIN unnest(?::text[], ?::int[]) AS w(id, idx)"
                " USING (id, idx)",
                ([i.id for i in items], [i.index for i in items]),
            ).fetchall()
        }
        return [found.get((item.id, item.index)) for item in items]

    def claim(self, pairs: list[tuple[Item, Row | None]]) -> list[tuple[Item, Row | None]]:
        if not pairs:
            return []
        items = [item for item, _ in pairs]
        granted = {
            (ident, idx): Row(*row)
            for ident, idx, *row in self._x(
                f"WITH free AS (SELECT i.id, i.idx FROM items i"
                f" JOIN unnest(?::text[], ?::int[]) AS w(id, idx) USING (id, idx)"
                f" WHERE i.lease_owner IS NULL OR i.lease_until < {NOW} OR i.lease_owner = ?"
                f" FOR UPDATE OF i SKIP LOCKED)"
                f" UPDATE items SET lease_owner = ?, lease_until = {NOW} + ? FROM free"
                f" WHERE items.id = free.id AND items.idx = free.idx"
                f" RETURNING items.id, items.idx, {', '.join(f'items.{c}' for c in ROW.split(', '))}",
                ([i.id for i in items], [i.index for i in items], self.worker, self.worker, self.lease_s),
            ).fetchall()
        }
        self.commit()
        return [(item, granted[item.id, item.index]) for item in items if (item.id, item.index) in granted]

    def release(self, items: list[Item]) -> None:
        if items:
            self._x(
                "UPDATE items SET lease_owner = NULL, lease_until = NULL FROM unnest(?::text[], ?::int[])"
                " AS w(id, idx) WHERE items.id = w.id AND items.idx = w.idx AND lease_owner = ?",
                ([i.id for i in items], [i.index for i in items], self.worker),
            )
            self.commit()

    def holds(self, item: Item) -> bool:
        found = self._x(
            f"SELECT 1 FROM items WHERE id = ? AND idx = ? AND lease_owner = ? AND lease_until > {NOW}",
            (item.id, item.index, self.worker),
        ).fetchone()
        return found is not None

    def _write(self, item: Item, fields: dict[str, Any]) -> None:
        """A fenced update: only while this worker holds the item's lease (items are seeded)."""
        settled = fields["status"] in (Status.DONE, Status.FAILED)
        fields |= {"fp": item.fingerprint, "prompt": item.prompt, "updated_at": time.time()}
        if settled:
            fields |= {"lease_owner": None, "lease_until": None}
        sets = ", ".join(f"{name} = ?" for name in fields)
        cursor = self._x(
            f"UPDATE items SET {sets} WHERE id = ? AND idx = ? AND lease_owner = ?",
            (*fields.values(), item.id, item.index, self.worker),
        )
        if cursor.rowcount == 0:
            raise LeaseLost(f"{item.name}: another worker took this item over")

    # -- workers

    def register(self) -> None:
        with self.transaction():
            self._x(
                "INSERT INTO workers (worker, host, pid, started_at, heartbeat_at)"
                f" VALUES (?, ?, ?, {NOW}, {NOW})",
                (self.worker, socket.gethostname(), os.getpid()),
            )

    def heartbeat(
        self, limits: Mapping[str, int], in_flight: Mapping[str, int]
    ) -> tuple[dict[str, int], int]:
        with self.transaction():
            self._x("SELECT pg_advisory_xact_lock(?)", (SHARES_LOCK,))
            self._x(f"UPDATE workers SET heartbeat_at = {NOW} WHERE worker = ?", (self.worker,))
            self._x(
                f"UPDATE items SET lease_until = {NOW} + ? WHERE lease_owner = ?", (self.lease_s, self.worker)
            )
            live = self._x(
                f"SELECT worker, shares FROM workers WHERE ended_at IS NULL AND heartbeat_at > {NOW} - ?"
                " ORDER BY started_at, worker",
                (self.live_s,),
            ).fetchall()
            names = [worker for worker, _ in live]
            rank, count = names.index(self.worker), len(names)  # this worker has just beaten
            others = [json.loads(shares) for worker, shares in live if worker != self.worker]
            allowed, published = {}, {}
            for key, limit in limits.items():
                share = limit // count + (rank < limit % count)
                free = limit - sum(int(o.get(key, 0)) for o in others)
                allowed[key] = max(0, min(share, free))
                published[key] = max(allowed[key], in_flight.get(key, 0))
            self._x("UPDATE workers SET shares = ? WHERE worker = ?", (json.dumps(published), self.worker))
        return allowed, count

    def retire(self) -> None:
        with self.transaction():
            self._x(f"UPDATE workers SET ended_at = {NOW}, shares = '{{}}' WHERE worker = ?", (self.worker,))
            self._x(
                "UPDATE items SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (self.worker,),
            )

    def workers(self) -> list[dict[str, Any]]:
        rows = self._x(
            f"SELECT worker, host, pid, {NOW} - started_at, {NOW} - heartbeat_at,"
            " (SELECT count(*) FROM items WHERE lease_owner = worker)"
            f" FROM workers WHERE ended_at IS NULL AND heartbeat_at > {NOW} - ? ORDER BY started_at",
            (self.live_s,),
        ).fetchall()
        self.commit()
        return [
            {
                "worker": w,
                "host": host,
                "pid": pid,
                "age_s": round(age),
                "heartbeat_s": round(beat, 1),
                "leases": leases,
            }
            for w, host, pid, age, beat, leases in rows
        ]


def _where(db: psycopg.Connection[Any]) -> str:
    """The server and database, for messages: never the password."""
    try:
        info = db.info
        return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"
    except psycopg.Error:
        return "PostgreSQL (connection lost)"
