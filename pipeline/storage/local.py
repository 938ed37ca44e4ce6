"""A local output folder: files are renamed into place and made durable with fsync."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from pipeline.fsync import fsync_path


class LocalStore:
    def __init__(self, folder: Path, spool_name: str = "") -> None:
        self.url = str(folder)
        self.local: Path | None = folder
        self.folder = folder
        self._own_spool = bool(spool_name)
        self._made_spool = False
        self.spool = folder / ".partial" / spool_name if spool_name else folder / ".partial"

    def prepare(self) -> None:
        self._made_spool = not self.spool.exists()
        for folder in (self.folder / "images", self.spool):
            folder.mkdir(parents=True, exist_ok=True)

    def put(self, source: Path, relative: str, *, replace: bool) -> bool:
        target = self.folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if replace:
            source.replace(target)
            return True
        try:
            os.link(source, target)  # atomic, and refuses an existing name
        except FileExistsError:
            return False
        source.unlink()
        return True

    def exists(self, relative: str) -> bool:
        return (self.folder / relative).exists()

    def open(self, relative: str) -> IO[bytes]:
        return (self.folder / relative).open("rb")

    def write_lines(self, relative: str, lines: Iterable[str]) -> None:
        path = self.folder / relative
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as out:
            for line in lines:
                out.write(line + "\n")
        fsync_path(tmp)
        tmp.replace(path)

    def delete(self, relative: str) -> None:
        (self.folder / relative).unlink(missing_ok=True)

    def sync(self) -> None:
        fsync_path(self.folder / "images")

    def close(self) -> None:
        if self._own_spool:
            shutil.rmtree(self.spool, ignore_errors=True)
        elif self._made_spool:
            with contextlib.suppress(OSError):
                self.spool.rmdir()  # when empty
