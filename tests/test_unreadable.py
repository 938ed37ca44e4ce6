"""Manifests and prompt files that are not readable text: one `FILE: ...` line, exit 2, nothing sent."""

from __future__ import annotations

import codecs
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.manifest import iter_items, load_manifest
from pipeline.simulator import Simulator
from tests.conftest import run

GOOD = 'jobs:\n  - {id: ok, prompt: "a cat"}\n'


def _binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def _bad_utf8(path: Path) -> None:
    path.write_bytes(b'jobs:\n  - {prompt: "caf\xe9 \xff"}\n')


def _utf16(path: Path) -> None:
    path.write_bytes("jobs:\n  - {prompt: 'a cat'}\n".encode("utf-16"))


def _control_character(path: Path) -> None:
    path.write_text('jobs:\n  - {prompt: "a \x07 bell"}\n')


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _directory(path: Path) -> None:
    path.mkdir()


def _nul_bytes(path: Path) -> None:
    path.write_bytes(b"a cat\n\x00\x00\x00\nanother\n")


MAKERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "binary": (_binary, "contains NUL bytes on line 1: not a text file"),
    "invalid UTF-8": (_bad_utf8, "not UTF-8 text: byte 0xe9 on line 2"),
    "empty": (_empty, "empty"),
    "a directory": (_directory, "is a directory"),
}
MANIFESTS = {**MAKERS, "a control character": (_control_character, "character #x0007 is not allowed")}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("make", "expected"), MANIFESTS.values(), ids=MANIFESTS.keys())
def test_unreadable_manifest(
    make: Callable[[Path], None],
    expected: str,
    command: str,
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "job.yaml"
    make(path)
    assert run(command, path) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ") and expected in lines[0], err
    assert "Traceback" not in err
    assert sim.stats.requests == 0


def test_utf16_with_a_bom_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What Windows tools save as "Unicode": the manifest and a prompts file are both read."""
    (tmp_path / "prompts.txt").write_bytes("a café\n猫\n".encode("utf-16"))
    path = tmp_path / "job.yaml"
    path.write_bytes("jobs:\n  - {id: ok, prompt: 'a cat'}\n  - prompts_file: prompts.txt\n".encode("utf-16"))
    assert run("validate", path) == 0
    assert "3 jobs, 3 items" in capsys.readouterr().out
    assert [i.prompt for i in iter_items(load_manifest(path))] == ["a cat", "a café", "猫"]


PROMPT_FILES = {**MAKERS, "NUL bytes": (_nul_bytes, "contains NUL bytes on line 2")}


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".jsonl"])
@pytest.mark.parametrize(("make", "expected"), PROMPT_FILES.values(), ids=PROMPT_FILES.keys())
def test_unreadable_prompts_file(
    make: Callable[[Path], None],
    expected: str,
    suffix: str,
    tmp_path: Path,
    sim: Simulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = tmp_path / f"prompts{suffix}"
    make(prompts)
    path = tmp_path / "job.yaml"
    path.write_text(f"output: {tmp_path / 'out'}\njobs:\n  - prompts_file: {prompts.name}\n")
    assert run("run", path) == 2
    err = capsys.readouterr().err
    assert f"{prompts}" in err and expected in err, err
    assert "Traceback" not in err
    assert sim.stats.requests == 0
    assert not (tmp_path / "out").exists()


def _as_nobody_if_root(argv: list[str]) -> tuple[int, str]:
    """`main(argv)` where the file permissions apply: in a forked child that gives up root."""
    if os.geteuid() != 0:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            return main(argv), err.getvalue()
    for codec in ("utf-8-sig", "utf-16"):  # imported on first use, from a folder only root may read
        codecs.lookup(codec)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run, report the exit code through the pipe
        code = 99
        try:
            os.close(read)
            os.dup2(write, 2)
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder another user can reach (pytest's own tmp folders are private to their owner)."""
    folder = Path(tempfile.mkdtemp(prefix="imagegen-perm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("target", ["manifest", "prompts file"])
def test_file_without_read_permission(target: str, open_folder: Path) -> None:
    tmp_path = open_folder
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    path = tmp_path / "job.yaml"
    path.write_text("jobs:\n  - prompts_file: prompts.txt\n")
    locked = path if target == "manifest" else prompts
    locked.chmod(0)
    code, err = _as_nobody_if_root(["validate", str(path)])
    assert code == 2, err
    assert f"{locked}: " in err and "Permission denied" in err, err
    assert "Traceback" not in err
