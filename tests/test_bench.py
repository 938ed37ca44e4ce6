"""A smoke test of `make bench` at tiny sizes: it runs, and its figures are sane. No speed is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(180)
def test_bench_runs_at_tiny_sizes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["latency_bound"]["exit"] == 0 and report["overhead_bound"]["exit"] == 0
    assert report["latency_bound"]["efficiency"] > 0 and report["overhead_bound"]["ratio_to_ceiling"] > 0
    assert [row["items"] for row in report["scale"]] == [1000, 5000]
    assert all(row["done_rerun_rss_mb"] > 10 for row in report["scale"])
    assert report["cap"]["exit"] == 0 and report["cap"]["peak_in_flight"] <= 64
    assert report["quota"]["exit"] == 0 and report["quota"]["efficiency"] > 0
    assert report["batch_collection"]["collect_s_all"] > 0 and report["batch_collection"]["speedup"] > 0
    assert (
        "efficiency" in result.stdout
        and "of a bare client" in result.stdout
        and "cap efficiency" in result.stdout
    )
