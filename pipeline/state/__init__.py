"""The state store, the single source of truth of an output: `State` is the interface.

Two backends: `sqlite` (the default: one file in the output folder, one worker under the folder's
lock) and `postgres` (one database shared by any number of workers, with leases; `pip install
'imagegen-pipeline[postgres]'`). `open_state` picks one from the state URL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pipeline.errors import ManifestError
from pipeline.locations import check_state_url, is_postgres
from pipeline.state.base import OPEN_STAGES, BatchRow, Row, State
from pipeline.state.sqlite import SqliteState

__all__ = [
    "DATABASE_ERRORS",
    "OPEN_STAGES",
    "BatchRow",
    "Row",
    "SqliteState",
    "State",
    "check_state_url",
    "is_postgres",
    "open_state",
    "sqlite_path",
]

# A state that cannot be read or written: the run stops (exit 74). The PostgreSQL backend raises
# StorageError itself, so psycopg is imported only by a run that uses it.
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)


def sqlite_path(url: str | None, output: str, folder: Path | None) -> Path:
    """Where a SQLite state is: `url`, else `state.db` in the local output `folder`."""
    if url:
        return Path(url)
    if folder is None:
        raise ManifestError(
            [
                f"output {output}: an object-store output needs a state URL: --state postgresql://...,"
                " or the path of a SQLite file for a single worker"
            ]
        )
    return folder / "state.db"


def open_state(
    url: str | None, output: str, folder: Path | None, *, readonly: bool = False, lease_s: float = 120.0
) -> State:
    """The state of an output: `url` (postgresql://... or a SQLite file), else `state.db` in the local
    output `folder`. Raises ManifestError when there is none to read, or no way to keep one."""
    if is_postgres(url):
        assert url is not None
        problem = check_state_url(url)
        if problem:
            raise ManifestError([f"state: {problem}"])
        try:
            from pipeline.state.postgres import PostgresState
        except ImportError as exc:
            raise ManifestError(
                [f"state {url}: needs psycopg: pip install 'imagegen-pipeline[postgres]' ({exc})"]
            ) from exc
        return PostgresState(url, output, readonly=readonly, lease_s=lease_s)
    path = sqlite_path(url, output, folder)
    if readonly and not path.is_file():
        raise ManifestError([f"{path}: no state here: not an output, or it never ran"])
    return SqliteState(path, readonly=readonly)
