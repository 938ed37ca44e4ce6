"""Many workers on one output: PostgreSQL state, S3 output (moto's server), the real CLI in processes.

Every item once, nothing paid twice, no corrupt object, the provider's concurrency held by the
whole run, and a SIGKILLed worker's items finished by the others after its leases ran out.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import s3fs
from PIL import Image

from pipeline.simulator import SimConfig, Simulator
from tests.conftest import KEY, PYTHON, run

ITEMS, CONCURRENCY = 600, 6
# Leases long enough that a 2-core machine running three workers, the servers and the simulator never
# lets a live worker's lease run out (a stall of 2 s was seen here): only the killed worker's do.
LEASE_S = 6.0


def manifest_for(folder: Path, items: int = ITEMS, **top: Any) -> Path:
    (folder / "prompts.txt").write_text("".join(f"{prompt}\n" for prompt in prompts(folder, items)))
    path = folder / "job.yaml"
    fields = {"concurrency": CONCURRENCY, "lease_s": LEASE_S, **top}
    path.write_text(
        "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items())
        + "jobs:\n  - prompts_file: prompts.txt\n"
    )
    return path


STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def prompts(folder: Path, items: int) -> list[str]:
    """This test's prompts: its own (a request still in flight from another test counts elsewhere)."""
    return [f"a lighthouse, study {n} ({folder.name})" for n in range(items)]


def generations(sim: Simulator, folder: Path, items: int = ITEMS) -> list[int]:
    """How many times the simulator generated each of this test's prompts."""
    return [sim.stats.prompts[prompt] for prompt in prompts(folder, items)]


def worker(manifest: Path, sim: Simulator, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "IMAGE_API_BASE_URL": sim.base_url, "IMAGE_API_KEY": KEY}
    process = subprocess.Popen(
        [PYTHON, "-m", "pipeline", "run", str(manifest), "--quiet", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    STARTED.append(process)
    return process


def reading(pg_url: str, s3_options: dict[str, str]) -> list[str]:
    """The options that find an output's state and store (for status, report, export)."""
    return ["--state", pg_url, "--storage-option", f"endpoint_url={s3_options['endpoint_url']}"]


def where(pg_url: str, s3_url: str, s3_options: dict[str, str]) -> list[str]:
    return ["--output", s3_url, *reading(pg_url, s3_options)]


def wait_for_generations(sim: Simulator, count: int) -> None:
    deadline = time.monotonic() + 60
    while sim.stats.generations < count:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def finish(process: subprocess.Popen[bytes], timeout: float = 120) -> int:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, (out + err).decode()
    return process.returncode


def bucket_images(s3_url: str, s3_options: dict[str, str]) -> dict[str, bytes]:
    fs = s3fs.S3FileSystem(client_kwargs=s3_options, skip_instance_cache=True)
    return {path.rsplit("/", 1)[1]: fs.cat_file(path) for path in fs.find(f"{s3_url}/images")}


def bucket_rows(
    s3_url: str, s3_options: dict[str, str], name: str = "metadata.jsonl"
) -> list[dict[str, Any]]:
    fs = s3fs.S3FileSystem(client_kwargs=s3_options, skip_instance_cache=True)
    return [json.loads(line) for line in fs.cat_file(f"{s3_url}/{name}").decode().splitlines()]


def assert_bucket_dataset(s3_url: str, s3_options: dict[str, str], items: int) -> None:
    """`items` objects, each decodes to its recorded size, one metadata row each."""
    objects = bucket_images(s3_url, s3_options)
    rows = bucket_rows(s3_url, s3_options)
    assert len(objects) == items and len(rows) == items
    assert sorted(r["file_name"].removeprefix("images/") for r in rows) == sorted(objects)
    for row in rows:
        with Image.open(io.BytesIO(objects[row["file_name"].removeprefix("images/")])) as image:
            image.load()
            assert image.size == (row["width"], row["height"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_workers_share_600_items_once_within_the_providers_concurrency(
    tmp_path: Path,
    sim: Simulator,
    pg_url: str,
    s3_url: str,
    s3_options: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim.reset(SimConfig(key=KEY, latency_s=0.05, jitter_s=0.03, distinct_images=4))
    manifest = manifest_for(tmp_path)
    workers = [worker(manifest, sim, *where(pg_url, s3_url, s3_options)) for _ in range(3)]
    wait_for_generations(sim, ITEMS // 3)
    assert run("status", s3_url, *reading(pg_url, s3_options), "--json") == 0
    live = json.loads(capsys.readouterr().out)["workers"]
    assert {w["pid"] for w in live} == {p.pid for p in workers}  # status shows the live workers
    for process in workers:
        finish(process)
    assert generations(sim, tmp_path) == [1] * ITEMS  # every item once
    assert sim.stats.peak_in_flight <= CONCURRENCY
    assert_bucket_dataset(s3_url, s3_options, ITEMS)
    requests = sim.stats.requests
    assert run("run", manifest, *where(pg_url, s3_url, s3_options)) == 0
    assert sim.stats.requests == requests


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_killed_worker_s_items_are_finished_by_the_others_after_its_lease(
    tmp_path: Path, sim: Simulator, pg_url: str, s3_url: str, s3_options: dict[str, str]
) -> None:
    sim.reset(SimConfig(key=KEY, latency_s=0.1, jitter_s=0.05, distinct_images=4))
    manifest = manifest_for(tmp_path)
    workers = [worker(manifest, sim, *where(pg_url, s3_url, s3_options)) for _ in range(3)]
    wait_for_generations(sim, ITEMS // 4)
    workers[0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    workers[0].wait(10)
    for process in workers[1:]:
        finish(process)
    assert time.monotonic() - killed_at >= LEASE_S  # its leased items waited for the lease to run out
    paid = generations(sim, tmp_path)
    assert min(paid) == 1 and sum(paid) <= ITEMS + CONCURRENCY  # at most what it had in flight, again
    assert_bucket_dataset(s3_url, s3_options, ITEMS)
    requests = sim.stats.requests
    assert run("run", manifest, *where(pg_url, s3_url, s3_options)) == 0
    assert sim.stats.requests == requests  # the final run pays for nothing


def test_status_report_and_export_read_an_s3_output(
    tmp_path: Path,
    sim: Simulator,
    pg_url: str,
    s3_url: str,
    s3_options: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = manifest_for(tmp_path, 5)
    assert run("run", manifest, *where(pg_url, s3_url, s3_options)) == 0
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # from here the S3 server is known by --storage-option only
    capsys.readouterr()
    assert run("status", s3_url, *reading(pg_url, s3_options), "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["output"], status["done"], status["workers"]) == (s3_url, 5, [])
    assert run("report", s3_url, *reading(pg_url, s3_options)) == 0
    assert capsys.readouterr().out.strip() == f"{s3_url}/report.html"
    assert run("export", s3_url, *reading(pg_url, s3_options), "--shard-size", "2") == 0
    fs = s3fs.S3FileSystem(client_kwargs=s3_options, skip_instance_cache=True)
    assert b"lighthouse" in fs.cat_file(f"{s3_url}/report.html")
    assert len(fs.find(f"{s3_url}/thumbs")) == 5
    assert len(fs.find(f"{s3_url}/webdataset")) == 3
    assert run("export", s3_url, *reading(pg_url, s3_options), "--format", "parquet") == 0
    assert sorted(path.rsplit("/", 1)[1] for path in fs.find(f"{s3_url}/parquet")) == [
        "README.md",
        "train-00000-of-00001.parquet",
    ]


def test_the_s3_output_loads_with_datasets(
    tmp_path: Path, sim: Simulator, pg_url: str, s3_url: str, s3_options: dict[str, str]
) -> None:
    import datasets

    manifest = manifest_for(tmp_path, 4)
    assert run("run", manifest, *where(pg_url, s3_url, s3_options)) == 0
    # datasets 5 resolves `data_dir` as a local path; `data_files=<dir>/**` is what it stands for. It
    # streams a remote imagefolder (downloading it first loses the files' place beside metadata.jsonl).
    loaded = datasets.load_dataset(
        "imagefolder",
        data_files={"train": f"{s3_url}/**"},
        storage_options={"client_kwargs": s3_options},
        split="train",
        streaming=True,
    )
    rows = list(loaded)
    assert sorted(row["prompt"] for row in rows) == sorted(prompts(tmp_path, 4))
    assert all(row["image"].size == (row["width"], row["height"]) for row in rows)


def test_one_worker_with_a_sqlite_file_may_write_to_s3(
    tmp_path: Path, sim: Simulator, s3_url: str, s3_options: dict[str, str]
) -> None:
    manifest = manifest_for(tmp_path, 6)
    options = ["--storage-option", f"endpoint_url={s3_options['endpoint_url']}"]
    assert run("run", manifest, "--output", s3_url, "--state", tmp_path / "state.db", *options) == 0
    assert_bucket_dataset(s3_url, s3_options, 6)


def test_an_s3_output_without_a_state_is_refused_before_any_request(
    tmp_path: Path, sim: Simulator, s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("run", manifest_for(tmp_path, 3), "--output", s3_url) == 2
    assert "needs a state URL" in capsys.readouterr().err
    assert sim.stats.requests == 0 and not Path(".lock").exists()  # nothing locked or written here


def test_an_unreachable_state_is_a_clear_error(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.servers import free_port

    url = f"postgresql://nobody@127.0.0.1:{free_port()}/db"
    assert run("run", manifest_for(tmp_path, 3), "--state", url) == 74
    err = capsys.readouterr().err
    assert "cannot use the state or the output" in err and "127.0.0.1" in err
    assert sim.stats.requests == 0


def ray_listeners() -> list[str]:
    """The TCP listeners of Ray's processes (GCS, raylet, workers), as `ss` prints them."""
    ss = shutil.which("ss")
    assert ss, "ss (Debian's iproute2) is needed to see what Ray listens on"
    lines = subprocess.run([ss, "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [line for line in lines if any(name in line for name in ('"gcs_server"', '"raylet"', '"ray::'))]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_runs_three_workers_on_a_local_cluster_bound_to_loopback(
    tmp_path: Path, sim: Simulator, pg_url: str, s3_url: str, s3_options: dict[str, str]
) -> None:
    sim.reset(SimConfig(key=KEY, latency_s=0.05, jitter_s=0.03, distinct_images=4))
    manifest = manifest_for(tmp_path)
    env = {
        **os.environ,
        "IMAGE_API_BASE_URL": sim.base_url,
        "IMAGE_API_KEY": KEY,
        "RAY_USAGE_STATS_ENABLED": "0",
        "HOME": str(tmp_path),  # Ray's auth token goes to ~/.ray
    }
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "pipeline",
            "run",
            str(manifest),
            "--ray",
            "--workers",
            "3",
            *where(pg_url, s3_url, s3_options),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    STARTED.append(process)
    seen: set[str] = set()
    while process.poll() is None:
        seen.update(" ".join(line.split()[3:4]) for line in ray_listeners())
        time.sleep(0.2)
    out, err = process.communicate()
    assert process.returncode == 0, (out + err).decode()
    assert b"3 worker(s) on Ray: exit 0" in out
    assert seen and all(address.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for address in seen), seen
    assert generations(sim, tmp_path) == [1] * ITEMS
    assert sim.stats.peak_in_flight <= CONCURRENCY
    assert_bucket_dataset(s3_url, s3_options, ITEMS)


def test_ray_refuses_many_workers_on_a_sqlite_state(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("run", manifest_for(tmp_path, 3), "--ray", "--workers", "2") == 2
    assert "a SQLite state is one worker's" in capsys.readouterr().err
    assert sim.stats.requests == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_two_node_ray_cluster_takes_shared_outputs_and_refuses_a_local_one(
    tmp_path: Path,
    sim: Simulator,
    pg_url: str,
    s3_url: str,
    s3_options: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "HOME": str(tmp_path),
        "IMAGE_API_BASE_URL": sim.base_url,
        "IMAGE_API_KEY": KEY,
    }.items():
        monkeypatch.setenv(name, value)  # before Ray is imported: its nodes bind 127.0.0.1 only
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        manifest = manifest_for(tmp_path, 30)
        command = [PYTHON, "-m", "pipeline", "run", str(manifest), "--ray", cluster.address]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert refused.returncode == 2 and "the cluster has 2 nodes" in refused.stderr
        assert sim.stats.requests == 0
        shared = subprocess.run(
            [*command, "--workers", "2", *where(pg_url, s3_url, s3_options)],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert shared.returncode == 0, shared.stderr
        assert generations(sim, tmp_path, 30) == [1] * 30
        assert_bucket_dataset(s3_url, s3_options, 30)
    finally:
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_workers_split_a_providers_requests_per_minute(
    tmp_path: Path, sim: Simulator, pg_url: str, s3_url: str, s3_options: dict[str, str]
) -> None:
    sim.reset(SimConfig(key=KEY, latency_s=0.02, distinct_images=4))
    manifest = manifest_for(tmp_path, 60, requests_per_minute=600)  # 10 a second for the whole run
    workers = [worker(manifest, sim, *where(pg_url, s3_url, s3_options)) for _ in range(2)]
    for process in workers:
        finish(process)
    times = sorted(sim.stats.request_times)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    # Unshared, two workers would send 20 in a second. A join is seen within a heartbeat (1 s), when a
    # worker alone may still use the whole rate: a little over 10 at most, never 20.
    assert generations(sim, tmp_path, 60) == [1] * 60 and busiest <= 13, busiest


def test_credentials_in_storage_options_are_refused(
    tmp_path: Path, sim: Simulator, s3_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = manifest_for(
        tmp_path, 3, storage_options={"client_kwargs": {"aws_secret_access_key": "s3cr3t"}}
    )
    assert run("run", manifest, "--output", s3_url) == 2
    err = capsys.readouterr().err
    assert (
        "client_kwargs.aws_secret_access_key: credentials come from the environment" in err
        and "s3cr3t" not in err
    )
    assert run("run", manifest_for(tmp_path, 3), "--storage-option", "secret=s3cr3t", "--output", s3_url) == 2
    err = capsys.readouterr().err
    assert "--storage-option secret: credentials come from the environment" in err and "s3cr3t" not in err
    assert sim.stats.requests == 0


def test_the_dry_run_of_a_shared_output_reads_its_state(
    tmp_path: Path,
    sim: Simulator,
    pg_url: str,
    s3_url: str,
    s3_options: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = manifest_for(tmp_path, 4)
    assert run("run", manifest, *where(pg_url, s3_url, s3_options), "--dry-run", "--log-format", "json") == 0
    assert json.loads(capsys.readouterr().out)["new"] == 4
    assert run("run", manifest, *where(pg_url, s3_url, s3_options)) == 0
    manifest_for(tmp_path, 6)  # two more prompts
    capsys.readouterr()
    assert run("run", manifest, *where(pg_url, s3_url, s3_options), "--dry-run", "--log-format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["done"], plan["new"], plan["paid_requests"]) == (4, 2, 2)


def test_an_s3_store_lists_images_once_and_still_sees_what_others_store_later(
    s3_url: str, s3_options: dict[str, str]
) -> None:
    from pipeline.simulator import render_png
    from pipeline.storage import open_store

    ours, theirs = open_store(s3_url, s3_options), open_store(s3_url, s3_options)
    ours.prepare()
    theirs.prepare()
    try:
        for name in ("one", "two"):
            (theirs.spool / name).write_bytes(render_png(8, 8, name))
        assert theirs.put(theirs.spool / "one", "images/one.png", replace=False)
        assert ours.exists("images/one.png")  # from the listing
        assert theirs.put(theirs.spool / "two", "images/two.png", replace=False)
        assert ours.exists("images/two.png")  # stored after the listing: asked, not taken as absent
        assert not ours.exists("images/three.png")
        (ours.spool / "late").write_bytes(render_png(8, 8, "late"))
        assert ours.put(ours.spool / "late", "images/two.png", replace=False) is False  # create-if-absent
        with ours.open("images/two.png") as stored:
            assert stored.read() == render_png(8, 8, "two")
    finally:
        ours.close()
        theirs.close()
