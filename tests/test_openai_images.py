"""OpenAI's Images API (`protocol: openai-images`): the official SDK against `pipeline simulate`, and
runs end to end: sizes from the catalog, bytes stored as sent, refusals, throttles, quota, edits with
reference images, cost from token usage."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.providers.openai_images import classify_images, size_for, usage_of
from pipeline.simulator import Simulator
from tests.conftest import KEY, assert_dataset_consistent, failures, metadata, run, write_manifest
from tests.test_core import item
from tests.test_simulator import simulate

PROVENANCE = b"caBX" + b"c2pa: simulated provenance manifest"


def images_provider(sim: Simulator, **extra: Any) -> dict[str, Any]:
    return {
        "name": "openai",
        "protocol": "openai-images",
        "base_url": sim.base_url,
        "api_key_env": "OPENAI_API_KEY",
        "model": "gpt-image-2",
        **extra,
    }


@pytest.fixture(autouse=True)
def _openai_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "PNG")
    return out.getvalue()


def test_the_openai_sdk_generates_and_edits_on_simulate(tmp_path: Path) -> None:
    from openai import OpenAI

    with simulate("--key", "sk-sdk") as (_, base_url):
        client = OpenAI(base_url=base_url, api_key="sk-sdk", max_retries=0)
        made = client.images.generate(model="gpt-image-2", prompt="a lighthouse", size="1536x1024", n=1)
        assert made.data and made.data[0].b64_json and made.usage and made.usage.output_tokens > 0
        data = base64.b64decode(made.data[0].b64_json)
        assert PROVENANCE in data and Image.open(io.BytesIO(data)).size == (1536, 1024)
        first, second = tmp_path / "a.png", tmp_path / "b.png"
        first.write_bytes(png(64, 64, (200, 0, 0)))
        second.write_bytes(png(64, 64, (0, 0, 200)))
        with first.open("rb") as one, second.open("rb") as two:
            edited = client.images.edit(model="gpt-image-2", image=[one, two], prompt="both, blended")
        assert edited.data and edited.data[0].b64_json


def test_images_end_to_end_sizes_bytes_and_cost(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = [
        {"id": "wide", "prompt": "a wide bay", "aspect_ratio": "3:2"},
        {"id": "odd", "prompt": "a long pier", "aspect_ratio": "5:2"},  # any ratio gpt-image-2 takes
    ]
    manifest = write_manifest(tmp_path, jobs, providers=[images_provider(sim, quality="medium")])
    assert run("run", manifest, "--log-format", "json") == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    rows = {row["id"]: row for row in assert_dataset_consistent(tmp_path / "out")}
    assert (rows["wide"]["width"], rows["wide"]["height"]) == (1536, 1024)  # the catalog's exact size
    assert rows["odd"]["width"] / rows["odd"]["height"] == pytest.approx(2.5, rel=0.03)
    assert not any(row["aspect_ratio_mismatch"] for row in rows.values())
    for row in rows.values():  # stored as sent: the provenance chunk survives, byte for byte
        assert PROVENANCE in (tmp_path / "out" / row["file_name"]).read_bytes()
    per_image = (10 * 5 + 40 * 8 + 1056 * 30) / 1_000_000  # the simulator's usage, the catalog's prices
    assert summary["providers"]["openai"]["cost_usd"] == round(2 * per_image, 4)


def test_images_refusal_throttle_and_quota(
    tmp_path: Path, sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    sim.config.refuse_words = ("forbidden",)
    sim.config.rate_429 = 0.3
    jobs = [{"id": "ok", "prompt": "a harbour", "count": 10}, {"id": "no", "prompt": "something forbidden"}]
    manifest = write_manifest(tmp_path, jobs, providers=[images_provider(sim)])
    assert run("run", manifest, "--quiet") == 1
    assert [(f["id"], f["error_type"]) for f in failures(tmp_path / "out")] == [("no", "refusal")]
    assert len(metadata(tmp_path / "out")) == 10 and sim.stats.faults["429"] > 0
    sim.config.rate_429, sim.config.quota_exhausted = 0.0, True
    (tmp_path / "more").mkdir()
    more = write_manifest(
        tmp_path / "more", [{"prompt": "a quay", "count": 5}], providers=[images_provider(sim)]
    )
    assert run("run", more, "--quiet") == 3
    assert "no quota left" in capsys.readouterr().err and failures(tmp_path / "more" / "out") == []


def test_edits_send_every_reference_image(tmp_path: Path, sim: Simulator) -> None:
    refs = [png(32, 32, (10, 200, 10)), png(32, 32, (200, 10, 10))]
    for n, data in enumerate(refs):
        (tmp_path / f"ref{n}.png").write_bytes(data)
    jobs = [{"id": "e", "prompt": "both together", "images": ["ref0.png", "ref1.png"], "aspect_ratio": "1:1"}]
    manifest = write_manifest(tmp_path, jobs, providers=[images_provider(sim)])
    assert run("run", manifest, "--quiet") == 0
    assert {hashlib.sha256(data).hexdigest() for data in refs} <= set(sim.stats.reference_images)
    assert len(metadata(tmp_path / "out")) == 1


def test_images_classification_and_sizes() -> None:
    ok = json.dumps(
        {
            "data": [{"b64_json": "aGVsbG8="}],
            "output_format": "webp",
            "usage": {
                "input_tokens_details": {"text_tokens": 7},
                "output_tokens_details": {"image_tokens": 272},
            },
        }
    ).encode()
    assert classify_images(200, {}, ok) == (
        ["data:image/webp;base64,aGVsbG8="],
        {"input_text": 7, "output_image": 272},
    )
    blocked = b'{"error": {"message": "rejected by the safety system", "type": "image_generation_user_error", "code": "moderation_blocked"}}'
    assert type(classify_images(400, {}, blocked)).__name__ == "RefusalError"
    broke = b'{"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}}'
    outcome = classify_images(429, {}, broke)
    assert type(outcome).__name__ == "FatalError" and outcome.kind == "quota"  # type: ignore[union-attr]
    slow = b'{"error": {"message": "Rate limit reached for images per minute", "type": "requests", "code": "rate_limit_exceeded"}}'
    throttled = classify_images(429, {"retry-after": "2"}, slow)
    assert throttled.kind == "rate_limited" and throttled.retry_after == 2.0  # type: ignore[union-attr]
    gone = b'{"error": {"message": "The model gpt-image-1 does not exist", "code": "model_not_found"}}'
    assert classify_images(404, {}, gone).kind == "model_retired"  # type: ignore[union-attr]
    assert type(classify_images(200, {}, b'{"data": []}')).__name__ == "NoImageError"
    assert usage_of(None) == {}
    from pipeline.catalog import shipped

    assert size_for(item(0, "3:2"), "gpt-image-2", shipped()) == "1536x1024"
    assert size_for(item(0, "16:9"), "gpt-image-2", shipped()) == "1360x768"
    assert size_for(item(0, "16:9"), "unknown-model", shipped()) == "auto"


def test_a_jobs_images_options_are_sent_over_the_providers_and_are_part_of_the_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.manifest import ProviderSpec, iter_items, load_manifest
    from pipeline.providers.openai_images import request_fields

    spec = ProviderSpec(name="o", protocol="openai-images", quality="low", background="opaque")
    jobs = [{"id": "a", "prompt": "x", "quality": "high"}, {"id": "b", "prompt": "x"}]
    path = write_manifest(tmp_path, jobs, providers=[{"name": "o", "protocol": "openai-images"}])
    first, second = iter_items(load_manifest(path))
    fields = request_fields(first, spec, "1024x1024")
    assert (fields["quality"], fields["background"], fields["n"]) == ("high", "opaque", 1)
    assert request_fields(second, spec, "auto")["quality"] == "low"
    assert first.fingerprint != second.fingerprint  # a new quality is a new image
    chat = write_manifest(tmp_path, [{"prompt": "x", "quality": "high"}])
    assert run("validate", chat) == 2
    assert "jobs[0].quality: only for providers of protocol openai-images" in capsys.readouterr().err
