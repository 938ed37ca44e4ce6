"""What a state URL or an output URL is, read from the text alone: pure, and importing nothing of ours
(the manifest checks them, the state and storage backends open them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

POSTGRES_SCHEMES = ("postgresql", "postgres")
LOCAL_SCHEMES = ("", "file")
CREDENTIAL_WORDS = ("secret", "password", "token", "credential", "sas", "connection_string")
CREDENTIAL_NAMES = {"key", "account_key", "aws_access_key_id"}


def is_postgres(url: str | None) -> bool:
    return url is not None and urlsplit(url).scheme in POSTGRES_SCHEMES


def check_state_url(url: str) -> str | None:
    """What is wrong with a state URL, if anything (without repeating a password in it)."""
    if not is_postgres(url):
        return None if "://" not in url else "must be postgresql://... or the path of a SQLite file"
    parts = urlsplit(url)
    if parts.password is not None or "password=" in parts.query:
        return "holds a password: put it in PGPASSWORD or ~/.pgpass (libpq reads both), not in the URL"
    return None


def is_local(url: str) -> bool:
    return _scheme(url) in LOCAL_SCHEMES


def _scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isalnum() and len(head) > 1 else ""


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")) if _scheme(url) == "file" else Path(url)


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
