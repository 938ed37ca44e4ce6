"""Many providers in one pool, over real HTTP: routing, failover, limits found, Google's native API."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.simulator import SimConfig, Simulator, SimulatorThread
from tests.conftest import KEY, PYTHON, assert_dataset_consistent, failures, metadata, run, write_manifest

KEY_B = "sk-test-second-provider-5d1e"


@pytest.fixture
def sim_b(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    """A second provider: another simulator instance with its own key."""
    with SimulatorThread(SimConfig(key=KEY_B)) as simulator:
        monkeypatch.setenv("KEY_B", KEY_B)
        yield simulator


def provider(name: str, sim: Simulator, key_env: str = "IMAGE_API_KEY", **extra: Any) -> dict[str, Any]:
    native = extra.get("protocol") == "gemini"
    return {"name": name, "base_url": sim.origin if native else sim.base_url, "api_key_env": key_env, **extra}


def by_provider(output: Path) -> Counter[str]:
    return Counter(row["provider"] for row in metadata(output))


def test_two_providers_with_different_caps_finish_one_manifest(
    tmp_path: Path, sim: Simulator, sim_b: Simulator
) -> None:
    for s, cap in ((sim, 3), (sim_b, 6)):
        s.config.latency_s, s.config.image_scale, s.config.max_in_flight = 0.05, 8, cap
    providers = [provider("a", sim, concurrency=8), provider("b", sim_b, "KEY_B", concurrency=8)]
    jobs = [{"id": "p{n}", "prompt": "picture {n}", "matrix": {"n": list(range(120))}}]
    manifest = write_manifest(tmp_path, jobs, providers=providers)
    assert run("run", manifest) == 0
    rows = assert_dataset_consistent(tmp_path / "out")
    assert len(rows) == 120
    counts = by_provider(tmp_path / "out")
    assert counts == {"a": sim.stats.generations, "b": sim_b.stats.generations}
    assert min(counts.values()) > 0
    everything = sim.stats.prompts + sim_b.stats.prompts
    assert len(everything) == 120 and set(everything.values()) == {1}  # every image once
    for s, cap in ((sim, 3), (sim_b, 6)):
        assert s.stats.peak_in_flight <= 8
        # the first burst finds the cap (8 - cap refusals, not billed), then refusals stay rare
        assert s.stats.statuses[429] <= (8 - cap) + 0.05 * s.stats.requests, s.stats.statuses


def test_a_provider_with_a_wrong_key_is_disabled_and_the_other_finishes(
    tmp_path: Path,
    sim: Simulator,
    sim_b: Simulator,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KEY_B", "sk-wrong")
    providers = [provider("good", sim, priority=2), provider("bad", sim_b, "KEY_B", priority=1)]
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 30}], providers=providers)
    assert run("run", manifest) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "provider bad" in line]
    assert len(warnings) == 1 and "disabled for the rest of the run: Invalid token" in warnings[0], (
        captured.err
    )
    assert by_provider(tmp_path / "out") == {"good": 30}
    assert sim_b.stats.generations == 0 and sim_b.stats.statuses[401] == sim_b.stats.requests <= 8
    assert "bad: requests" in captured.out and "DISABLED: Invalid token" in captured.out
    assert run("status", tmp_path / "out", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["providers"]["bad"]["disabled"].startswith("Invalid token")
    assert status["providers"]["good"]["images"] == 30 and status["done"] == 30
    assert "sk-wrong" not in (tmp_path / "out/state.db").read_bytes().decode("latin-1")


def test_every_provider_fatal_exits_3_with_items_resumable(
    tmp_path: Path, sim: Simulator, sim_b: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim.config.quota_exhausted = True
    monkeypatch.setenv("KEY_B", "sk-wrong")
    providers = [provider("a", sim), provider("b", sim_b, "KEY_B")]
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 10}], providers=providers)
    assert run("run", manifest) == 3
    assert failures(tmp_path / "out") == [] and metadata(tmp_path / "out") == []
    sim.config.quota_exhausted = False
    assert run("run", manifest, "--provider", "a") == 0
    assert by_provider(tmp_path / "out") == {"a": 10}


def test_priority_spills_over_only_while_the_first_is_full(
    tmp_path: Path, sim: Simulator, sim_b: Simulator
) -> None:
    for s in (sim, sim_b):
        s.config.latency_s, s.config.image_scale = 0.05, 8
    providers = [
        provider("cheap", sim, concurrency=2, priority=1, price_per_image=0.01),
        provider("dear", sim_b, "KEY_B", concurrency=6, priority=2, price_per_image=0.05),
    ]
    jobs = [{"id": "a", "prompt": "x", "count": 60}]
    manifest = write_manifest(tmp_path, jobs, providers=providers)
    assert run("run", manifest, "--log-format", "json") == 0
    assert sim.stats.peak_in_flight == 2 and sim_b.stats.peak_in_flight <= 6
    counts = by_provider(tmp_path / "out")
    assert counts["cheap"] > 0 and counts["dear"] > counts["cheap"] and counts.total() == 60
    sim.reset(SimConfig(key=KEY, latency_s=0.05, image_scale=8))
    sim_b.reset(SimConfig(key=KEY_B))
    (tmp_path / "two").mkdir()
    cheap_only = write_manifest(tmp_path / "two", jobs, providers=providers, concurrency=2)
    assert run("run", cheap_only) == 0
    assert by_provider(tmp_path / "two/out") == {"cheap": 60} and sim_b.stats.requests == 0


def _stats(base_url: str) -> dict[str, Any]:
    import urllib.request

    origin = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{origin}/_sim/stats", timeout=5) as resp:  # noqa: S310 (our loopback simulator)
        return dict(json.loads(resp.read()))


@pytest.mark.slow
def test_a_provider_whose_process_dies_mid_run(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim.config.latency_s, sim.config.image_scale = 0.02, 8
    monkeypatch.setenv("DYING_KEY", "sk-dying")
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "pipeline",
            "simulate",
            "--port",
            "0",
            "--latency",
            "0.05",
            "--jitter",
            "0",
            "--image-scale",
            "8",
            "--key",
            "sk-dying",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().split("IMAGE_API_BASE_URL=")[1].split()[0]
        killed: list[int] = []

        def kill_after_some_work() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                served = _stats(base_url)["generations"]
                if served >= 20:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append(served)
                    return
                time.sleep(0.01)

        providers = [
            {"name": "dying", "base_url": base_url, "api_key_env": "DYING_KEY", "priority": 1},
            provider("steady", sim, priority=2),
        ]
        manifest = write_manifest(
            tmp_path, [{"id": "a", "prompt": "x", "count": 150}], providers=providers, backoff_base_s=0.05
        )
        killer = threading.Thread(target=kill_after_some_work)
        killer.start()
        assert run("run", manifest) == 0
        killer.join()
    finally:
        proc.kill()
        proc.communicate(timeout=10)  # reaped, its pipe closed
    assert killed, "the provider was never killed"
    rows = assert_dataset_consistent(tmp_path / "out")
    assert len(rows) == 150
    counts = by_provider(tmp_path / "out")
    assert 0 < counts["dying"] <= killed[0] + 8 and counts["steady"] == sim.stats.generations


def test_native_protocol_end_to_end(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    sim.config.refuse_words = ("forbidden",)
    sim.config.rate_429_retry_after, sim.config.retry_after_s = 0.15, 0.05
    providers = [provider("google", sim, "GEMINI_API_KEY", protocol="gemini")]
    jobs = [
        {"id": "ok", "prompt": "a lighthouse", "count": 30, "aspect_ratio": "16:9"},
        {"id": "no", "prompt": "something forbidden"},
    ]
    manifest = write_manifest(tmp_path, jobs, providers=providers)
    assert run("run", manifest) == 1
    rows = assert_dataset_consistent(tmp_path / "out")
    assert len(rows) == 30 and {(r["width"], r["height"], r["provider"]) for r in rows} == {
        (1344, 768, "google")
    }
    assert [(f["id"], f["error_type"]) for f in failures(tmp_path / "out")] == [("no", "refusal")]
    assert sim.stats.faults["429ra"] > 0 and sim.stats.key_in_url == 0
    summary = capsys.readouterr().out
    assert "retries" in summary and sim.stats.statuses[429] == sim.stats.faults["429ra"]
    sim.reset(SimConfig(key=KEY, quota_exhausted=True))
    (tmp_path / "q").mkdir()
    assert run("run", write_manifest(tmp_path / "q", jobs, providers=providers)) == 3
    assert (
        "no provider left (google: quota exhausted: RESOURCE_EXHAUSTED Your prepayment credits"
        in capsys.readouterr().out
    )


def test_the_controller_finds_a_hidden_in_flight_cap(tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s, sim.config.jitter_s, sim.config.image_scale = 0.25, 0.05, 8
    sim.config.max_in_flight = 16
    jobs = [{"id": "p{n}", "prompt": "picture {n}", "matrix": {"n": list(range(480))}}]
    assert run("run", write_manifest(tmp_path, jobs, concurrency=64)) == 0
    assert len(metadata(tmp_path / "out")) == 480 and set(sim.stats.prompts.values()) == {1}
    refused = sim.stats.statuses[429] / sim.stats.requests
    assert refused <= 0.03, (sim.stats.statuses, sim.stats.requests)
    assert sim.stats.peak_in_flight <= 64


@pytest.mark.parametrize("headers", [False, True], ids=["retry-after", "rate-limit headers"])
def test_a_sliding_quota_is_paced(headers: bool, tmp_path: Path, sim: Simulator) -> None:
    sim.config.latency_s, sim.config.image_scale = 0.02, 8
    sim.config.quota, sim.config.quota_window_s, sim.config.rate_limit_headers = 40, 0.5, headers
    jobs = [{"id": "p{n}", "prompt": "picture {n}", "matrix": {"n": list(range(200))}}]
    assert run("run", write_manifest(tmp_path, jobs, concurrency=16)) == 0
    assert len(metadata(tmp_path / "out")) == 200 and set(sim.stats.prompts.values()) == {1}
    refused = sim.stats.statuses[429]
    assert refused == sim.stats.faults["over_quota"]
    if headers:  # paced before the quota runs out: refusals only from what was already in flight
        assert refused <= 0.05 * sim.stats.requests, sim.stats.statuses


BAD = {
    "api and providers": (
        "api: {model: x}\nproviders:\n  - {name: a}\n",
        "providers: a manifest has `api:` or `providers:`, not both (line 3)",
    ),
    "duplicate names": (
        "providers:\n  - {name: a}\n  - {name: a}\n",
        'providers[1].name: "a" is also the name of providers[0] (line 3)',
    ),
    "unknown protocol": (
        "providers:\n  - {name: a, protocol: grpc}\n",
        "providers[0].protocol: \"grpc\" is not one of 'openai-chat', 'gemini' or 'openai-images' (line 2)",
    ),
    "bad name": ('providers:\n  - {name: "a b"}\n', "providers[0].name: String should match pattern"),
    "stream on gemini": (
        "providers:\n  - {name: a, protocol: gemini, stream: true}\n",
        "providers[0].stream: only for protocol openai-chat",
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD.values(), ids=BAD.keys())
def test_bad_providers(
    text: str, expected: str, tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text + 'jobs:\n  - {prompt: "x"}\n')
    assert run("run", path) == 2
    assert f"{path}: {expected}" in capsys.readouterr().err
    assert sim.stats.requests == 0


def test_every_provider_problem_at_once_with_its_line(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("UNSET_KEY", raising=False)
    path = tmp_path / "m.yaml"
    path.write_text(
        "providers:\n"
        "  - {name: a, base_url: http://127.0.0.1:9}\n"
        "  - {name: a, base_url: http://127.0.0.1:9}\n"
        "  - {name: b, protocol: grpc}\n"
        "  - {name: c, api_key_env: UNSET_KEY, base_url: http://127.0.0.1:9}\n"
        'jobs:\n  - {prompt: "x"}\n'
    )
    assert run("run", path) == 2
    err = capsys.readouterr().err
    assert f'{path}: providers[1].name: "a" is also the name of providers[0] (line 3)' in err
    assert f"{path}: providers[2].protocol: " in err and "(line 4)" in err
    assert f"{path}: providers[3].api_key_env: environment variable UNSET_KEY is not set" in err
    assert "(line 5)" in err and sim.stats.requests == 0


def test_missing_keys_and_unknown_provider_names(
    tmp_path: Path, sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    providers = [
        provider("a", sim),
        provider("g", sim, "GEMINI_API_KEY", protocol="gemini"),
        provider("c", sim, "NOPE_KEY"),
    ]
    manifest = write_manifest(tmp_path, [{"prompt": "x"}], providers=providers)
    assert run("run", manifest) == 2
    err = [re.sub(r" \(line \d+\)$", "", line) for line in capsys.readouterr().err.splitlines()]
    assert err == [
        f"{manifest}: providers[1].api_key_env: environment variable GEMINI_API_KEY is not set (or use --simulate)",
        f"{manifest}: providers[2].api_key_env: environment variable NOPE_KEY is not set (or use --simulate)",
    ]
    assert run("run", manifest, "--provider", "zz") == 2
    assert "--provider zz: no such provider (the manifest has a, g, c)" in capsys.readouterr().err
    assert run("run", manifest, "--provider", "a") == 0 and sim.stats.requests == 1


def test_dry_run_prices_at_the_first_provider_and_the_report_shows_each(
    tmp_path: Path, sim: Simulator, sim_b: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    providers = [
        provider("dear", sim_b, "KEY_B", priority=2, price_per_image=0.05),
        provider("cheap", sim, priority=1, price_per_image=0.01),
    ]
    manifest = write_manifest(tmp_path, [{"id": "a", "prompt": "x", "count": 10}], providers=providers)
    assert run("run", manifest, "--dry-run", "--log-format", "json") == 0
    assert json.loads(capsys.readouterr().out)["cost_usd"] == 0.1
    assert run("run", manifest) == 0
    assert run("report", tmp_path / "out") == 0
    html = (tmp_path / "out/report.html").read_text()
    counts = by_provider(tmp_path / "out")
    for name, price in (("cheap", 0.01), ("dear", 0.05)):
        n = counts[name]
        assert f"<dt>provider {name}</dt><dd>{n} images, {n} requests, ${n * price:.2f}</dd>" in html
