"""Google's flex tier on a gemini provider: half price synchronously, sheddable, slower."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import FatalError, RetryableError
from pipeline.manifest import ProviderSpec
from pipeline.providers.gemini import request_body, shed
from pipeline.simulator import Simulator
from tests.conftest import KEY, metadata, run, write_manifest
from tests.test_core import item


@pytest.fixture(autouse=True)
def _gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", KEY)


def flex(folder: Path, sim: Simulator, count: int, **top: Any) -> Path:
    providers = [
        {"name": "google-flex", "protocol": "gemini", "base_url": sim.origin, "service_tier": "flex"}
    ]
    return write_manifest(
        folder, [{"id": "f", "prompt": "a fjord", "count": count}], providers=providers, **top
    )


def test_flex_is_asked_for_priced_half_and_recorded(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = flex(tmp_path, sim, 6)
    assert run("run", manifest, "--dry-run", "--log-format", "json") == 0
    assert json.loads(capsys.readouterr().out)["cost_usd"] == round(6 * 0.0195, 2)
    assert run("run", manifest, "--log-format", "json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    tokens = 1290 * 30.0 / 1_000_000  # the reply's usageMetadata at the catalog's token price
    assert summary["providers"]["google-flex"]["cost_usd"] == round(6 * tokens / 2, 4)  # flex: half
    assert sim.stats.faults["flex_requests"] == 6
    assert {row["service_tier"] for row in metadata(tmp_path / "out")} == {"flex"}


def test_a_reply_served_at_another_tier_is_priced_at_it(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.flex_served_tier = "standard"
    assert run("run", flex(tmp_path, sim, 4), "--log-format", "json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["providers"]["google-flex"]["cost_usd"] == round(4 * 1290 * 30.0 / 1_000_000, 4)


def test_shed_requests_are_retried_at_no_attempts_cost(tmp_path: Path, sim: Simulator) -> None:
    sim.config.flex_shed_rate = 0.5  # half the flex requests shed: 503 or 429 RESOURCE_EXHAUSTED
    assert run("run", flex(tmp_path, sim, 20, max_attempts=1), "--quiet") == 0  # one attempt each
    assert len(metadata(tmp_path / "out")) == 20 and sim.stats.faults["shed"] > 0
    assert sim.stats.generations == 20


def test_flex_request_body_timeout_and_shedding_rules() -> None:
    assert request_body(item(0), None, "flex")["service_tier"] == "flex"
    assert "service_tier" not in request_body(item(0))
    spec = ProviderSpec(name="g", protocol="gemini", service_tier="flex")
    assert spec.read_timeout_s == 1200 and ProviderSpec(name="g", protocol="gemini").read_timeout_s == 180
    assert ProviderSpec(name="g", protocol="gemini", service_tier="flex", timeout_s=60).read_timeout_s == 60
    busy = RetryableError("RESOURCE_EXHAUSTED Flex capacity", kind="rate_limited")
    assert shed(busy, 429, "Flex capacity is exhausted").kind == "shed"
    assert shed(RetryableError("UNAVAILABLE", kind="server_error"), 503, "").kind == "shed"
    daily = FatalError("daily limit reached", kind="quota")
    assert shed(daily, 429, "GenerateRequestsPerDayPerProjectPerModel") is daily
    broke = FatalError("quota exhausted", kind="quota")
    assert shed(broke, 429, "Your prepayment credits are depleted") is broke


def test_flex_only_on_gemini(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_manifest(tmp_path, [{"prompt": "x"}], providers=[{"name": "r", "service_tier": "flex"}])
    assert run("validate", path) == 2
    assert "providers[0].service_tier: only for protocol gemini" in capsys.readouterr().err
