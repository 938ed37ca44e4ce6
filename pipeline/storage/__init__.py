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

LOCAL_SCHEMES = ("", "file")
CREDENTIAL_WORDS = ("secret", "password", "token", "credential", "sas", "connection_string")
CREDENTIAL_NAMES = {"key", "account_key", "aws_access_key_id"}


def credentials_in(options: Mapping[str, Any]) -> list[str]:
    """The names in `options` (at any depth, dotted) that hold credentials: those come from the
    environment, or the store's own config files and roles."""
    found = []
    for name, value in options.items():
        lowered = str(name).lower()
        if lowered in CREDENTIAL_NAMES or any(word in lowered for word in CREDENTIAL_WORDS):
            found.append(str(name))
        elif isinstance(value, Mapping):
            found += [f"{name}.{inner}" for inner in credentials_in(value)]
    return found


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


def is_local(url: str) -> bool:
    return _scheme(url) in LOCAL_SCHEMES


def _scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isalnum() and len(head) > 1 else ""


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")) if _scheme(url) == "file" else Path(url)


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
