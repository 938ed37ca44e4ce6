"""`pipeline simulate` as users meet it: the key it expects, official SDKs as clients, bounded memory."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from pipeline.simulator import SimConfig, Simulator
from tests.conftest import KEY, PYTHON, run, write_manifest


@contextmanager
def simulate(*args: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """`pipeline simulate` on a free loopback port: (its first line, its base URL); stopped by pid."""
    with subprocess.Popen(
        [PYTHON, "-m", "pipeline", "simulate", "--port", "0", "--latency", "0", "--jitter", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env if env is not None else os.environ.copy(),
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"IMAGE_API_BASE_URL=(\S+)", line)
            assert match, line
            yield line, match.group(1)
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0


def _openai_image(base_url: str, key: str, ratio: str) -> tuple[int, int]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model="gemini-2.5-flash-image",
        messages=[{"role": "user", "content": "a lighthouse at dusk"}],
        extra_body={"extra_body": {"google": {"image_config": {"aspect_ratio": ratio}}}},
    )
    content = reply.choices[0].message.content or ""
    url = re.search(r"\]\((\S+)\)", content)
    assert url, content
    with urllib.request.urlopen(url.group(1), timeout=10) as resp:  # noqa: S310 (our loopback simulator)
        data = resp.read()
    with Image.open(io.BytesIO(data)) as image:
        return image.size


@pytest.mark.slow
def test_simulate_takes_the_exported_key_and_says_so() -> None:
    env = {**os.environ, "IMAGE_API_KEY": "sk-mine-123"}
    with simulate(env=env) as (line, base_url):
        assert "$IMAGE_API_KEY" in line and "sk-mine-123" not in line, line
        assert _openai_image(base_url, "sk-mine-123", "16:9") == (1344, 768)


@pytest.mark.slow
def test_simulate_key_flag_wins_and_default_is_printed() -> None:
    env = {**os.environ, "IMAGE_API_KEY": "sk-mine-123"}
    with simulate("--key", "flag-key", env=env) as (line, base_url):
        assert "--key" in line and "flag-key" not in line, line
        assert _openai_image(base_url, "flag-key", "9:16") == (768, 1344)
        from openai import AuthenticationError

        with pytest.raises(AuthenticationError):
            _openai_image(base_url, "sk-mine-123", "1:1")
    env.pop("IMAGE_API_KEY")
    with simulate(env=env) as (line, _):
        assert "IMAGE_API_KEY=sim-key" in line, line


def test_counters_per_prompt_stay_bounded(tmp_path: Path, sim: Simulator) -> None:
    sim.reset(SimConfig(key=KEY, window=20, image_scale=8))
    jobs = [{"id": "p{n}", "prompt": "prompt {n}", "matrix": {"n": list(range(60))}}]
    assert run("run", write_manifest(tmp_path, jobs, concurrency=8)) == 0
    assert sim.stats.requests == sim.stats.generations == 60
    assert len(sim.stats.prompts) == len(sim.stats.request_times) == 20
    assert set(sim.stats.prompts.values()) == {1}


@pytest.mark.slow
def test_google_genai_sdk_gets_an_image_from_simulate() -> None:
    from google import genai
    from google.genai import types

    env = {**os.environ, "IMAGE_API_KEY": "sk-native-456"}
    with simulate(env=env) as (line, _):
        origin = re.search(r"native: (\S+)", line)
        assert origin, line
        client = genai.Client(
            api_key="sk-native-456", http_options=types.HttpOptions(base_url=origin.group(1))
        )
        reply = client.models.generate_content(
            model="gemini-2.5-flash-image",
            contents="a lighthouse at dusk",
            config=types.GenerateContentConfig(
                response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio="16:9")
            ),
        )
        parts = reply.candidates[0].content.parts  # type: ignore[index, union-attr]
        data = next(p.inline_data.data for p in parts if p.inline_data)  # type: ignore[union-attr]
        with Image.open(io.BytesIO(data)) as image:  # type: ignore[arg-type]
            assert image.size == (1344, 768)
        wrong = genai.Client(api_key="sk-wrong", http_options=types.HttpOptions(base_url=origin.group(1)))
        from google.genai import errors

        with pytest.raises(errors.ClientError, match="API key not valid"):
            wrong.models.generate_content(model="gemini-2.5-flash-image", contents="x")


@pytest.mark.slow
def test_google_genai_sdk_runs_a_batch_job_on_simulate(tmp_path: Path) -> None:
    import time

    from google import genai
    from google.genai import types

    requests = tmp_path / "requests.jsonl"
    lines = [
        {
            "key": f"item-{n}",
            "request": {
                "contents": [{"parts": [{"text": f"a lighthouse, take {n}"}]}],
                "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
            },
        }
        for n in range(3)
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {**os.environ, "IMAGE_API_KEY": "sk-batch-789"}
    with simulate("--image-scale", "8", env=env) as (line, _):
        origin = re.search(r"native: (\S+)", line).group(1)  # type: ignore[union-attr]
        client = genai.Client(api_key="sk-batch-789", http_options=types.HttpOptions(base_url=origin))
        uploaded = client.files.upload(file=requests, config=types.UploadFileConfig(mime_type="jsonl"))
        job = client.batches.create(
            model="gemini-2.5-flash-image", src=uploaded.name, config={"display_name": "sdk-test"}
        )
        deadline = time.monotonic() + 30
        while job.state is None or job.state.name not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = client.batches.get(name=job.name)  # type: ignore[arg-type]
        assert job.state.name == "JOB_STATE_SUCCEEDED" and job.display_name == "sdk-test"
        assert job.dest is not None and job.dest.file_name
        results = client.files.download(file=job.dest.file_name)
        got = [json.loads(row) for row in results.decode().splitlines()]
        assert sorted(row["key"] for row in got) == ["item-0", "item-1", "item-2"]
        for row in got:
            data = row["response"]["candidates"][0]["content"]["parts"][0]["inlineData"]["data"]
            with Image.open(io.BytesIO(base64.b64decode(data))) as image:
                assert image.size == (1344 // 8, 768 // 8)
        assert any(b.name == job.name for b in client.batches.list())
