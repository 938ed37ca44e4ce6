"""One run per output folder: an OS file lock, released by the kernel even when a run is SIGKILLed."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from pipeline.errors import OutputLockedError


class OutputLock:
    def __init__(self, folder: Path) -> None:
        self._path = folder / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"{self._path.parent} is in use by another run (pid {holder}); try again when it ends"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def claimed(output: Path) -> Iterator[None]:
    """The output folder, locked for one run, with `images/` and an empty `.partial/` (what a killed
    run was writing is dropped: nothing there was recorded)."""
    for folder in (output / "images", output / ".partial"):
        folder.mkdir(parents=True, exist_ok=True)
    with OutputLock(output):
        shutil.rmtree(output / ".partial")
        (output / ".partial").mkdir()
        yield
