"""From images to a dataset: status, WebDataset export, the report in a real browser, imagefolder."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, ImageStat

from pipeline.simulator import Simulator
from tests.conftest import metadata, run, write_manifest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
JOBS = [
    {"id": "cat", "prompt": "a cat", "count": 2},
    {"id": "fox", "prompt": "a <b>fox</b> & friends"},
    {"id": "bad", "prompt": "forbidden thing"},
]


@pytest.fixture
def output(tmp_path: Path, sim: Simulator) -> Path:
    sim.config.refuse_words = ("forbidden",)
    assert run("run", write_manifest(tmp_path, JOBS)) == 1
    return tmp_path / "out"


def test_status_counts_and_last_run(output: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert run("status", output, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["items"], status["done"], status["failed"], status["in_progress"]) == (4, 3, 1, 0)
    assert status["failed_by_reason"] == {"refusal": 1}
    assert status["last_run"]["exit_code"] == 1 and status["last_run"]["summary"]["requests"] == 4
    assert run("status", output.parent / "job.yaml") == 0  # by manifest too
    text = capsys.readouterr().out
    assert "4 items recorded" in text and "failed 1 (refusal 1)" in text and "exit 1" in text


def test_webdataset_shards_read_back_with_tarfile(output: Path, tmp_path: Path) -> None:
    assert run("export", output, "--format", "webdataset", "--shard-size", "2", "--to", tmp_path / "wds") == 0
    shards = sorted((tmp_path / "wds").glob("*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()  # type: ignore[union-attr]
    assert len(samples) == 3 and all(set(s) == {"png", "json"} for s in samples.values())
    rows = {r["sha256"]: r for r in metadata(output)}
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert rows[meta["sha256"]] == meta
        assert Image.open(io.BytesIO(sample["png"])).size == (meta["width"], meta["height"])


def test_report_in_a_real_browser(output: Path) -> None:
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (`.ci/run` installs Debian's chromium package)")
    assert run("report", output) == 0
    page = output / "report.html"
    html = page.read_text()
    assert "<script src" not in html and "http" not in html.replace("http-equiv", "")  # no network
    assert "a &lt;b&gt;fox&lt;/b&gt; &amp; friends" in html  # prompts are escaped
    thumbs = sorted((output / "thumbs").iterdir())
    assert len(thumbs) == 3 and all(max(size_of(t)) <= 256 for t in thumbs)
    mtimes = [t.stat().st_mtime_ns for t in thumbs]
    assert run("report", output) == 0
    assert [t.stat().st_mtime_ns for t in thumbs] == mtimes  # made once, then cached
    seen = _inspect(page, output.parent / "chrome")
    assert seen["images"] == 3 and seen["loaded"] == 3
    assert seen["failures"] == 1 and "refusal" in seen["failure_text"]
    assert seen["after_filter"] == 2  # job filter "cat" leaves its two images
    shot = Image.open(io.BytesIO(seen["screenshot"])).convert("L")
    assert ImageStat.Stat(shot).stddev[0] > 10  # not blank


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def _inspect(page: Path, profile: Path) -> dict[str, Any]:
    """Open the page in headless Chromium and read what a person would see, through DevTools."""
    browser = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1200,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.1)
        return asyncio.run(_look(page, port_file.read_text().split()[0], deadline))
    finally:
        browser.kill()
        browser.wait(10)


async def _look(page: Path, port: str, deadline: float) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            target = next(t for t in await resp.json() if t["type"] == "page")
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            cdp = _Cdp(ws)
            await cdp.call("Page.navigate", url=page.as_uri())
            while (
                await cdp.evaluate("location.href + ' ' + document.readyState") != f"{page.as_uri()} complete"
            ):
                assert time.monotonic() < deadline + 30, "the report did not load"
                await asyncio.sleep(0.05)
            loaded = (
                "[...document.querySelectorAll('.grid img')].filter(i => i.complete && i.naturalWidth > 0)"
            )
            await cdp.evaluate(  # every thumbnail loaded, or give up after 10 s
                "new Promise(r => { const t0 = Date.now(); (function poll() {"
                f" {loaded}.length === document.querySelectorAll('.grid img').length || Date.now() - t0 > 10000"
                " ? r() : setTimeout(poll, 50); })(); })"
            )
            return {
                "images": await cdp.evaluate("document.querySelectorAll('.grid img').length"),
                "loaded": await cdp.evaluate(f"{loaded}.length"),
                "failures": await cdp.evaluate("document.querySelectorAll('tbody tr[data-job]').length"),
                "failure_text": await cdp.evaluate("document.querySelector('tbody').innerText"),
                "screenshot": base64.b64decode((await cdp.call("Page.captureScreenshot"))["data"]),
                "after_filter": await cdp.evaluate(
                    "job.value = 'cat'; job.dispatchEvent(new Event('change'));"
                    "document.querySelectorAll('.grid figure:not(.hidden)').length"
                ),
            }


class _Cdp:
    """The few Chrome DevTools Protocol calls the test needs, over aiohttp's websocket client."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), 30)
            if message.get("id") == self.next_id:
                return message["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        return result["result"].get("value")


def test_output_loads_as_a_hugging_face_imagefolder(
    output: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    datasets = pytest.importorskip("datasets", reason="the `datasets` test extra is not installed")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(output), split="train")
    assert dataset.num_rows == 3
    rows = {(r["id"], r["index"]): r for r in dataset}
    assert rows[("fox", 0)]["prompt"] == "a <b>fox</b> & friends"
    assert rows[("cat", 1)]["image"].size == (rows[("cat", 1)]["width"], rows[("cat", 1)]["height"])
    assert set(dataset.column_names) >= {"image", "prompt", "aspect_ratio", "model", "sha256", "created_at"}
