"""Real servers for the tests and the benchmark, on loopback only, each stopped by its pid.

- PostgreSQL: Debian's server binaries, a throwaway cluster (`initdb` in a temporary folder), on
  127.0.0.1 and a free port, host connections with a password (scram), which clients read from
  PGPASSWORD as libpq does. Run as the `postgres` user when we are root (initdb refuses root).
- S3: moto's standalone server, as s3fs's own tests use it, on 127.0.0.1 and a free port. moto sends
  no telemetry; botocore is kept off the instance-metadata address and away from any config file.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_USER = "pipeline"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_bin() -> Path | None:
    """Where Debian's (or any) PostgreSQL server binaries are, if installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), password=self.password, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user() -> dict[str, object]:
    """Run as the `postgres` system user when we are root (CI is); as ourselves otherwise."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="pipeline-pg-"))
    password = secrets.token_hex(12)
    run_as = _as_postgres_user()
    if run_as:
        os.chown(folder, int(run_as["user"]), int(run_as["group"]))  # type: ignore[call-overload]
    pwfile = folder / "pw"
    pwfile.write_text(password)
    if run_as:
        os.chown(pwfile, int(run_as["user"]), int(run_as["group"]))  # type: ignore[call-overload]
    data, port = folder / "data", free_port()
    subprocess.run(
        [
            bindir / "initdb",
            "-D",
            data,
            "-U",
            PG_USER,
            "--pwfile",
            pwfile,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ],
        check=True,
        capture_output=True,
        cwd=folder,
        **run_as,  # type: ignore[arg-type]
    )
    log = (folder / "log").open("wb")
    server = subprocess.Popen(
        [
            bindir / "postgres",
            "-D",
            data,
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            folder,
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            "logging_collector=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        cwd=folder,
        **run_as,  # type: ignore[arg-type]
    )
    try:
        _wait_port(port, server, folder / "log")
        _wait_ready(Postgres(port, password))
        yield Postgres(port, password)
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class S3:
    endpoint: str

    def bucket(self, name: str) -> str:
        """A new bucket (an anonymous PUT: moto takes it), as s3://NAME."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")  # noqa: S310 (loopback)
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            return f"s3://{name}"


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@contextlib.contextmanager
def s3_server() -> Iterator[S3]:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **S3_ENV},
        )
        try:
            _wait_port(port, server, None)
            yield S3(f"http://127.0.0.1:{port}")
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _wait_ready(server: Postgres) -> None:
    """The port answers before the server takes connections ("the database system is starting up")."""
    import psycopg

    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(server.url(), password=server.password, connect_timeout=5):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path | None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text() if log else process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server did not listen on 127.0.0.1:{port} within 60 s")
