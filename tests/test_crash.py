"""Crash safety: a `pipeline run` subprocess killed with SIGKILL, then rerun, finishes cleanly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from pipeline.simulator import Simulator
from tests.conftest import KEY, PYTHON, assert_dataset_consistent, write_manifest

ITEMS, CONCURRENCY = 60, 4


def start(manifest: Path, sim: Simulator, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "IMAGE_API_BASE_URL": sim.base_url, "IMAGE_API_KEY": KEY}
    return subprocess.Popen(
        [PYTHON, "-m", "pipeline", "run", str(manifest), "--quiet", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_generations(sim: Simulator, count: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while sim.stats.generations < count and process.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)


def images_are_final(output: Path) -> None:
    """Only complete, final names in images/: no temp file, nothing half-written."""
    for path in (output / "images").glob("*"):
        assert path.suffix == ".png" and not path.name.startswith("."), path


def test_sigkill_midway_then_rerun_finishes_without_paying_twice(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s, sim.config.jitter_s = 0.03, 0.02
    manifest = write_manifest(
        tmp_path, [{"id": "k", "prompt": "kill me", "count": ITEMS}], concurrency=CONCURRENCY
    )
    with start(manifest, sim) as process:
        wait_for_generations(sim, ITEMS // 2, process)
        process.send_signal(signal.SIGKILL)
    output = tmp_path / "out"
    images_are_final(output)
    with start(manifest, sim) as rerun:
        assert rerun.wait(60) == 0, rerun.stderr.read() if rerun.stderr else ""
    rows = assert_dataset_consistent(output)
    assert len(rows) == ITEMS
    assert not list((output / ".partial").iterdir())
    assert ITEMS <= sim.stats.generations <= ITEMS + CONCURRENCY


def test_kill_9_at_10_random_moments_loses_nothing_and_pays_little(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s, sim.config.jitter_s, sim.config.image_scale = 0.05, 0.03, 4
    items = 200
    manifest = write_manifest(
        tmp_path, [{"id": "r", "prompt": "again", "count": items}], concurrency=CONCURRENCY
    )
    output, rng, kills, runs = tmp_path / "out", random.Random(7), 0, 0
    while kills < 10:
        with start(manifest, sim) as process:
            runs += 1
            time.sleep(rng.uniform(0.3, 1.2))  # interpreter start-up included: kills land anywhere
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGKILL)
        kills += 1
        images_are_final(output)
    with start(manifest, sim) as final:
        runs += 1
        assert final.wait(90) == 0
    rows = assert_dataset_consistent(output)  # files == metadata rows, each decodes and matches its sha256
    assert len(rows) == items == len({r["file_name"] for r in rows})
    assert not list((output / ".partial").iterdir())
    assert kills == 10 and sim.stats.generations <= items + kills * CONCURRENCY
    print(
        f"\nkill-9: runs {runs}, kills {kills}, items {items}, generations {sim.stats.generations}, "
        f"duplicates 0, corrupt 0"
    )
