"""Where an output lives: a local folder (as always) or any fsspec URL (`s3://`, `gs://`, `az://`, ...).

`Store` is the interface the runner, the dataset files, the report and the export write through. The
layout under it is the same everywhere: `images/<name>.<ext>`, `metadata.jsonl`, `failures.jsonl`.
An image reaches a store only whole: it is verified in a local spool file first, then moved (a local
rename) or uploaded in one PUT (multipart when large); `put(..., replace=False)` is create-if-absent,
so a worker that lost an item's lease cannot overwrite the image another worker wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

from pipeline.errors import ManifestError
from pipeline.locations import credentials_in, is_local, local_path

__all__ = ["Store", "credentials_in", "is_local", "local_path", "open_store"]


class Store(Protocol):
    url: str  # the output as the user named it (no credentials: those come from the store's library)
    local: Path | None  # the folder, when the output is local
    spool: Path  # a local folder for files on their way in (on the same filesystem when local)

    def prepare(self) -> None:
        """Make the folders a run writes to."""
        ...

    def put(self, source: Path, relative: str, *, replace: bool) -> bool:
        """Move a finished local file into place. With `replace=False` nothing is overwritten: False
        when something is already there (create-if-absent)."""
        ...

    def exists(self, relative: str) -> bool: ...

    def open(self, relative: str) -> IO[bytes]: ...

    def write_lines(self, relative: str, lines: Iterable[str]) -> None:
        """Replace a text file at once: readers see the old one or the new one."""
        ...

    def delete(self, relative: str) -> None: ...

    def sync(self) -> None:
        """Make every `put` so far durable (before the state records it)."""
        ...

    def close(self) -> None: ...


def open_store(url: str, options: Mapping[str, Any], spool_name: str = "") -> Store:
    """The store of an output URL. `spool_name` gives a worker its own spool folder, for outputs that
    many workers write at once."""
    if is_local(url):
        from pipeline.storage.local import LocalStore

        return LocalStore(local_path(url), spool_name)
    from pipeline.storage.remote import RemoteStore

    try:
        return RemoteStore(url, dict(options))
    except (ImportError, ValueError) as exc:
        raise ManifestError([f"output {url}: {exc}"]) from exc
