"""An output in object storage, through fsspec (s3fs, gcsfs, adlfs, ...).

Credentials, region and endpoint come from where the store's own library reads them (for S3:
botocore's environment variables, config files and instance roles); `storage_options` passes the
rest (`endpoint_url`, ...). An upload is one PUT of a verified file, multipart when large; S3's
create-if-absent (`If-None-Match: *`) backs `put(..., replace=False)`, elsewhere an existence check
right before the PUT does.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, cast

import fsspec
from fsspec.core import url_to_fs

IMAGES = "images/"


class RemoteStore:
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.local: Path | None = None
        self._fs, root = url_to_fs(self.url, **options)
        self._root = root.rstrip("/")
        self._exclusive = "mode" in inspect.signature(self._fs.put_file).parameters
        self._images: set[str] | None = None  # what images/ held at the first look, and since put
        self.spool = Path(tempfile.gettempdir()) / f"pipeline-spool-{uuid.uuid4().hex}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs

    def _path(self, relative: str) -> str:
        return f"{self._root}/{relative}"

    def prepare(self) -> None:
        self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)

    def put(self, source: Path, relative: str, *, replace: bool) -> bool:
        target = self._path(relative)
        if replace:
            self._fs.put_file(str(source), target)
        elif self._exclusive:
            try:
                self._fs.put_file(str(source), target, mode="create")
            except FileExistsError:
                return False
        elif self._fs.exists(target):
            return False
        else:
            self._fs.put_file(str(source), target)
        source.unlink(missing_ok=True)
        if self._images is not None and relative.startswith(IMAGES):
            self._images.add(relative)
        return True

    def exists(self, relative: str) -> bool:
        """Images are looked up in one listing of `images/`, taken at the first call (a rerun of a
        million done items makes a thousand LIST requests, not a million HEADs); a name not in it is
        asked for, as another worker may have stored it since."""
        if relative.startswith(IMAGES):
            if self._images is None:
                self._images = self._list(IMAGES)
            if relative in self._images:
                return True
        return bool(self._fs.exists(self._path(relative)))

    def _list(self, folder: str) -> set[str]:
        prefix = self._path(folder)
        try:
            found = {path[len(self._root) + 1 :] for path in self._fs.find(prefix)}
        finally:
            self._fs.invalidate_cache(prefix)  # fsspec's listing cache would answer "absent" from now on
        return found

    def open(self, relative: str) -> IO[bytes]:
        return cast(IO[bytes], self._fs.open(self._path(relative), "rb"))

    def write_lines(self, relative: str, lines: Iterable[str]) -> None:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.spool, delete=False) as out:
            for line in lines:
                out.write(line + "\n")
        self.put(Path(out.name), relative, replace=True)  # one PUT: readers see the old or the new file

    def delete(self, relative: str) -> None:
        if self._images is not None:
            self._images.discard(relative)
        try:
            self._fs.rm_file(self._path(relative))
        except FileNotFoundError:
            return

    def sync(self) -> None:
        """A PUT is durable once it returns."""

    def close(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)
