"""Every run ends and leaves everything resumable, against relays that fail the way real ones do:
bounded outages (exit 75), daily caps as quotas (exit 3), a misconfigured provider never fails items
for good, and a failure that is the item's own is still recorded. Real HTTP to the simulator."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import PERMANENT_KINDS
from pipeline.simulator import Simulator
from tests.conftest import KEY, failures, metadata, run, write_manifest

CLOUDFLARE_502 = (
    "<html><head><title>example.com | 502: Bad gateway</title></head><body>cloudflare</body></html>"
)
NGINX_504 = "<html><head><title>504 Gateway Time-out</title></head><body><center>nginx</center></body></html>"
GOOGLE_429 = json.dumps(
    {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "message": "Resource has been exhausted (e.g. check quota).",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "34s"}],
        }
    }
)
JSON = (("Content-Type", "application/json"),)
HTML = (("Content-Type", "text/html"),)
# Twelve ways a relay keeps failing, one per item (the word is in the item's prompt).
ALWAYS_FAILING: tuple[tuple[str, int, tuple[tuple[str, str], ...], str], ...] = (
    ("w01", 429, (*JSON, ("Retry-After", "20")), '{"error": {"message": "Too Many Requests"}}'),
    ("w02", 429, JSON, GOOGLE_429),
    ("w03", 500, JSON, '{"error": {"message": "empty response", "type": "new_api_error"}}'),
    ("w04", 502, HTML, CLOUDFLARE_502),
    ("w05", 503, JSON, '{"error": {"message": "no available channel for model", "type": "new_api_error"}}'),
    ("w06", 504, HTML, NGINX_504),
    ("w07", 429, JSON, '{"error": {"message": "rate limit", "type": "rate_limit_error"}}'),
    (
        "w08",
        429,
        JSON,
        '{"error": {"message": "当前分组上游负载已饱和，请稍后再试", "type": "upstream_error"}}',  # noqa: RUF001
    ),
    ("w09", 503, (*JSON, ("Retry-After", "5")), '{"error": {"message": "overloaded", "type": "overloaded"}}'),
    ("w10", 0, (), ""),  # the connection is dropped
    ("w11", 200, JSON, '{"error": {"message": "upstream error", "type": "upstream_error"}}'),
    (
        "w12",
        520,
        HTML,
        "<html><head><title>520: Web server is returning an unknown error</title></head></html>",
    ),
)


def plan_of(manifest: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert run("run", manifest, "--dry-run", "--log-format", "json") == 0
    plan: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return plan


def status_of(manifest: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert run("status", manifest, "--json") == 0
    status: dict[str, Any] = json.loads(capsys.readouterr().out)
    return status


def test_twelve_always_failing_relays_end_and_fail_nothing_for_good(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.replies = ALWAYS_FAILING
    jobs = [{"id": word, "prompt": f"a lighthouse {word}"} for word, *_ in ALWAYS_FAILING]
    manifest = write_manifest(tmp_path, jobs, max_attempts=2, max_outage_s=30, concurrency=12)
    started = time.monotonic()
    code = run("run", manifest, "--quiet")
    elapsed = time.monotonic() - started
    print(f"twelve always-failing replies: exit {code} in {elapsed:.1f} s, {sim.stats.requests} requests")
    assert code == 75  # the provider is down (no success for 30 s): try later
    assert "down: no success for" in capsys.readouterr().err
    assert all(row["error_type"] not in PERMANENT_KINDS for row in failures(tmp_path / "out"))
    plan = plan_of(manifest, capsys)
    assert plan["failed"] == 0  # nothing failed for good: a plain rerun tries every item
    assert sum(plan[step] for step in ("new", "retry")) == 12
    # Retry-After honoured: after the 20 s one, nothing was sent until it had passed.
    log = list(sim.stats.log)
    first = next(t for t, prompt, status in log if "w01" in prompt and status == 429)
    assert not [t for t, _, _ in log if first + 1.0 < t < first + 19.9]


def test_a_provider_that_fails_its_first_seconds_is_ridden_out(tmp_path: Path, sim: Simulator) -> None:
    sim.config.outage_s = 5.0  # 503 "no available channel" for everything, then fine
    manifest = write_manifest(tmp_path, [{"id": "o", "prompt": "a harbour", "count": 20}], concurrency=4)
    assert run("run", manifest, "--quiet") == 0  # the default max_outage_s (600) rides it out
    assert len(metadata(tmp_path / "out")) == 20
    assert sim.stats.faults["outage"] >= 5 and sim.stats.generations == 20


def test_a_daily_cap_disables_the_provider_and_keeps_every_item(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    daily = json.dumps(
        {
            "error": {
                "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model"
                " requests per day",
                "code": 429,
                "metadata": {"headers": {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1796428800000"}},
            }
        }
    )
    sim.config.replies = (("tide", 429, (*JSON, ("X-RateLimit-Remaining", "0")), daily),)
    manifest = write_manifest(tmp_path, [{"id": "d", "prompt": "a tide pool", "count": 30}], concurrency=4)
    assert run("run", manifest, "--quiet") == 3
    assert sim.stats.requests <= 4  # the first answers disable it: no retry for ever
    assert "daily limit reached" in capsys.readouterr().err
    status = status_of(manifest, capsys)
    assert status["failed"] == 0 and "daily limit" in status["providers"]["default"]["disabled"]
    assert plan_of(manifest, capsys)["new"] == 30  # every item still to generate


def misspelt(folder: Path, model: str, **top: Any) -> Path:
    providers = [{"name": "relay", "model": model, "concurrency": 4, **top.pop("relay", {})}]
    providers += top.pop("more", [])
    jobs = [{"id": "m{n}", "prompt": "a meadow {n}", "matrix": {"n": list(range(30))}}]
    return write_manifest(folder, jobs, model="gemini-2.5-flash-image", providers=providers, **top)


def test_a_misspelt_provider_model_fails_no_item_then_the_fixed_run_does_all(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = misspelt(tmp_path, "gemini-2.5-flash-imagee")
    assert run("run", manifest, "--quiet") == 3
    err = capsys.readouterr().err
    assert "the same error on 10 items in a row" in err and "gemini-2.5-flash-imagee" in err
    assert sim.stats.requests <= 10 + 4 and sim.stats.generations == 0
    assert status_of(manifest, capsys)["failed"] == 0
    assert plan_of(manifest, capsys)["new"] == 30
    manifest = misspelt(tmp_path, "gemini-2.5-flash-image")  # fixed: the same items (same model)
    assert run("run", manifest, "--quiet") == 0
    assert len(metadata(tmp_path / "out")) == 30 and status_of(manifest, capsys)["failed"] == 0


def test_a_misspelt_provider_hands_its_items_to_another(tmp_path: Path, sim: Simulator) -> None:
    other = {"name": "good", "model": "gemini-2.5-flash-image", "concurrency": 2, "priority": 2}
    manifest = misspelt(tmp_path, "nano-banana-typo", more=[other])
    assert run("run", manifest, "--quiet") == 0
    rows = metadata(tmp_path / "out")
    assert len(rows) == 30 and {row["provider"] for row in rows} == {"good"}
    assert sim.stats.generations == 30


def test_an_error_that_is_the_items_own_is_still_recorded(tmp_path: Path, sim: Simulator) -> None:
    bad = '{"error": {"message": "prompt too long", "type": "invalid_request_error"}}'
    sim.config.replies = (("ruin", 400, JSON, bad),)
    jobs = [
        {"id": "fine", "prompt": "a castle", "count": 6},
        {"id": "bad", "prompt": "a ruin", "count": 2},
    ]
    manifest = write_manifest(tmp_path, jobs, concurrency=2)
    assert run("run", manifest, "--quiet") == 1
    assert sorted((row["id"], row["error_type"]) for row in failures(tmp_path / "out")) == [
        ("bad", "invalid_request"),
        ("bad", "invalid_request"),
    ]
    assert len(metadata(tmp_path / "out")) == 6
    assert sim.stats.requests == 8  # a permanent error is not tried again


def test_the_key_is_not_in_any_outage_message(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.replies = (("storm", 503, JSON, f'{{"error": {{"message": "down for {KEY}"}}}}'),)
    manifest = write_manifest(tmp_path, [{"id": "k", "prompt": "a storm"}], max_outage_s=1, max_attempts=100)
    assert run("run", manifest) == 75
    said = capsys.readouterr()
    assert KEY not in said.out + said.err and KEY not in (tmp_path / "out" / "state.db").read_bytes().decode(
        "latin-1"
    )
