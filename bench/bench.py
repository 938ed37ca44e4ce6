"""`make bench`: the real CLI against the simulator, measured. Not a test: it prints one table and
writes it as JSON to output/bench/latest.json. Ratios matter, not absolute times (shared machine).

    python bench/bench.py           # the full sizes of the issue (several minutes)
    python bench/bench.py --quick   # tiny sizes: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from PIL import Image

from pipeline.manifest import iter_items, load_manifest
from pipeline.simulator import SimConfig, SimulatorThread, render_png
from pipeline.state import SqliteState

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.servers import postgres_bin, postgres_server  # noqa: E402 (the tests' throwaway PostgreSQL cluster)

DEFAULT_OUT = ROOT / "output" / "bench"
TICK = os.sysconf("SC_CLK_TCK")
SMALL_AND_FAST = ("--latency", "0", "--jitter", "0", "--image-scale", "16", "--distinct-images", "64")


class SimProcess:
    """`pipeline simulate` in its own process, so its CPU is measured apart from ours."""

    def __init__(self, *knobs: str) -> None:
        command = [sys.executable, "-m", "pipeline", "simulate", "--port", "0", "--key", "bench", *knobs]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.base_url = re.search(r"IMAGE_API_BASE_URL=(\S+)", line).group(1)  # type: ignore[union-attr]

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)


def measured(*args: str | Path, base_url: str) -> dict[str, Any]:
    """Run the CLI: its last JSON line, wall time, and its own CPU time and peak RSS (wait4)."""
    env = {**os.environ, "IMAGE_API_BASE_URL": base_url, "IMAGE_API_KEY": "bench"}
    command = [sys.executable, "-c", PEAK_RSS, *map(str, args), "--quiet", "--log-format", "json"]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = process.communicate()
    wall = time.perf_counter() - started
    peak_kb = int(re.findall(rb"VmHWM (\d+)", err)[-1])
    return {
        "result": json.loads(out.decode().strip().splitlines()[-1]),
        "wall_s": wall,
        "exit": process.returncode,
        "cpu_s": float(re.findall(rb"CPU ([\d.]+)", err)[-1]),
        "rss_mb": round(peak_kb / 1024, 1),
    }


# The CLI, reporting its own peak RSS and CPU as it exits. (A child's ru_maxrss from wait4 would
# include the bench's own memory, inherited at fork; VmHWM counts only the CLI's process image.)
PEAK_RSS = """
import atexit, os, sys
from pipeline.cli import main
def report():
    hwm = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    t = os.times()
    print(f"VmHWM {hwm}", f"CPU {t.user + t.system:.3f}", file=sys.stderr)
atexit.register(report)
sys.exit(main(sys.argv[1:]))
"""


def manifest(folder: Path, items: int, concurrency: int, **top: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts.jsonl"
    with prompts.open("w") as out:
        for n in range(items):
            out.write(json.dumps({"id": f"item-{n}", "prompt": f"benchmark prompt number {n}"}) + "\n")
    path = folder / "bench.yaml"
    body = {
        "output": str(folder / "out"),
        "concurrency": concurrency,
        **top,
        "jobs": [{"prompts_file": "prompts.jsonl", "id_field": "id"}],
    }
    path.write_text(yaml.safe_dump(body))
    return path


async def bare_client(base_url: str, items: int, concurrency: int) -> float:
    """The ceiling: the same requests and downloads with nothing else (no disk, state, checks)."""
    gate = asyncio.Semaphore(concurrency)
    url_re = re.compile(r"\]\((http[^)]+)\)")

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        body = {
            "model": "gemini-2.5-flash-image",
            "messages": [{"role": "user", "content": f"ceiling prompt {n}"}],
            "extra_body": {"google": {"image_config": {"aspect_ratio": "1:1"}}},
        }
        async with gate:
            headers = {"Authorization": "Bearer bench"}
            async with session.post(f"{base_url}/chat/completions", json=body, headers=headers) as resp:
                reply = await resp.json()
            url = url_re.search(reply["choices"][0]["message"]["content"]).group(1)  # type: ignore[union-attr]
            async with session.get(url) as resp:
                await resp.read()

    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, n) for n in range(items)))
        return items / (time.perf_counter() - started)


def latency_bound(items: int, out: Path) -> dict[str, Any]:
    concurrency, latency = 64, 0.5
    with SimProcess("--latency", str(latency), "--jitter", "0.1", "--distinct-images", "64") as sim:
        folder = _fresh(out / "latency")
        sim_cpu = sim.cpu_s()
        run = measured("run", manifest(folder, items, concurrency), base_url=sim.base_url)
        sim_cpu = sim.cpu_s() - sim_cpu
    rate = run["result"]["done"] / run["result"]["elapsed_s"]
    return {
        "items": items,
        "concurrency": concurrency,
        "items_per_s": round(rate, 1),
        "efficiency": round(rate / (concurrency / latency), 3),
        "cpu_ms_per_item": _per_item(run, items),
        "sim_cpu_s": round(sim_cpu, 1),
        "download_wait_p99_ms": run["result"]["download_wait_ms"]["p99"],
        "exit": run["exit"],
    }


def overhead_bound(items: int, out: Path) -> dict[str, Any]:
    concurrency = 64
    with SimProcess(*SMALL_AND_FAST) as sim:
        folder = _fresh(out / "overhead")
        sim_cpu = sim.cpu_s()
        run = measured("run", manifest(folder, items, concurrency), base_url=sim.base_url)
        ours_sim_cpu, sim_cpu = sim.cpu_s() - sim_cpu, sim.cpu_s()
        ceiling = asyncio.run(bare_client(sim.base_url, items, concurrency))
        ceiling_sim_cpu = sim.cpu_s() - sim_cpu
    rate = run["result"]["done"] / run["result"]["elapsed_s"]
    return {
        "items": items,
        "concurrency": concurrency,
        "items_per_s": round(rate, 1),
        "cpu_ms_per_item": _per_item(run, items),
        "peak_rss_mb": run["rss_mb"],
        "ceiling_items_per_s": round(ceiling, 1),
        "ratio_to_ceiling": round(rate / ceiling, 3),
        "sim_cpu_s_ours": round(ours_sim_cpu, 1),
        "sim_cpu_s_ceiling": round(ceiling_sim_cpu, 1),
        "download_wait_p99_ms": run["result"]["download_wait_ms"]["p99"],
        "exit": run["exit"],
    }


def scale(sizes: list[int], out: Path) -> list[dict[str, Any]]:
    rows = []
    with SimProcess(*SMALL_AND_FAST) as sim:
        for items in sizes:
            folder = _fresh(out / f"scale-{items}")
            path = manifest(folder, items, 64)
            plan = measured("run", path, "--dry-run", base_url=sim.base_url)
            working = measured("run", path, "--max-duration", "3", base_url=sim.base_url)
            _fake_done(path, folder / "out")
            rerun = measured("run", path, base_url=sim.base_url)
            assert rerun["result"]["requests"] == 0 and rerun["result"]["skipped"] == items, rerun
            rows.append(
                {
                    "items": items,
                    "fresh_plan_s": round(plan["wall_s"], 2),
                    "fresh_plan_rss_mb": plan["rss_mb"],
                    "working_run_rss_mb": working["rss_mb"],
                    "done_rerun_s": round(rerun["wall_s"], 2),
                    "done_rerun_rss_mb": rerun["rss_mb"],
                }
            )
            shutil.rmtree(folder)
    return rows


def _fake_done(path: Path, output: Path) -> None:
    """Record every item as done, each image a hard link to a small PNG (setup, not measured)."""
    shutil.rmtree(output, ignore_errors=True)
    (output / "images").mkdir(parents=True)
    picture = render_png(64, 64, "bench")
    with SqliteState(output / "state.db") as state, state.transaction():
        for n, item in enumerate(iter_items(load_manifest(path))):
            if n % 50_000 == 0:  # ext4 allows 65,000 links to one file
                template = output / f"template-{n}.png"
                template.write_bytes(picture)
            name = f"images/{item.name}.png"
            os.link(template, output / name)
            state.record_done(item, {"file_name": name, "sha256": "0", "bytes": 0})


def _sim_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url.removesuffix('/v1')}/_sim/stats", timeout=10) as resp:  # noqa: S310
        return dict(json.loads(resp.read()))


def cap_efficiency(items: int, out: Path) -> dict[str, Any]:
    """A provider that answers 429 above C requests in flight, C unknown to us; we allow 64."""
    cap, latency = 16, 0.5
    knobs = ("--latency", str(latency), "--jitter", "0.1", "--distinct-images", "64", "--image-scale", "4")
    with SimProcess(*knobs, "--max-in-flight", str(cap)) as sim:
        run = measured("run", manifest(_fresh(out / "cap"), items, 64), base_url=sim.base_url)
        stats = _sim_stats(sim.base_url)
    rate = run["result"]["done"] / run["result"]["elapsed_s"]
    return {
        "items": items,
        "cap": cap,
        "concurrency": 64,
        "items_per_s": round(rate, 1),
        "efficiency": round(rate / (cap / latency), 3),
        "peak_in_flight": stats["peak_in_flight"],
        "share_429": round(stats["statuses"].get("429", 0) / stats["requests"], 4),
        "exit": run["exit"],
    }


def quota_efficiency(items: int, out: Path) -> dict[str, Any]:
    """A provider allowing R requests per sliding window W (600 a minute, as 100 per 10 s), 429 with
    Retry-After above it. Efficiency: the least time the quota allows, (items / R - 1) * W, over
    the time taken."""
    quota, window = (100, 10.0) if items >= 300 else (20, 2.0)
    knobs = ("--latency", "0.5", "--jitter", "0.1", "--distinct-images", "64", "--image-scale", "4")
    with SimProcess(*knobs, "--quota", str(quota), "--quota-window", str(window)) as sim:
        run = measured("run", manifest(_fresh(out / "quota"), items, 32), base_url=sim.base_url)
        stats = _sim_stats(sim.base_url)
    elapsed = run["result"]["elapsed_s"]
    return {
        "items": items,
        "quota": quota,
        "window_s": window,
        "per_minute": round(run["result"]["done"] / elapsed * 60),
        "quota_per_minute": round(quota * 60 / window),
        "efficiency": round((items / quota - 1) * window / elapsed, 3),
        "share_429": round(stats["statuses"].get("429", 0) / stats["requests"], 4),
        "exit": run["exit"],
    }


def workers(items: int, out: Path) -> dict[str, Any]:
    """1, 2 and 4 workers on one manifest (overhead-bound: an instant simulator), sharing a PostgreSQL
    state and a local output folder; throughput from the first start to the last exit, as a ratio to
    one worker. One worker on the default SQLite state for comparison."""
    concurrency, rates = 64, {}
    with SimProcess(*SMALL_AND_FAST) as sim, postgres_server() as pg:
        env = {
            **os.environ,
            "IMAGE_API_BASE_URL": sim.base_url,
            "IMAGE_API_KEY": "bench",
            "PGPASSWORD": pg.password,
        }
        for count in (0, 1, 2, 4):  # 0: one worker, SQLite
            folder = _fresh(out / f"workers-{count}")
            path = manifest(folder, items, concurrency)
            state = ["--state", pg.create_database(f"bench_{count}")] if count else []
            command = [sys.executable, "-m", "pipeline", "run", str(path), "--quiet", *state]
            started = time.perf_counter()
            processes = [subprocess.Popen(command, env=env) for _ in range(max(count, 1))]
            codes = [process.wait() for process in processes]
            elapsed = time.perf_counter() - started
            assert codes == [0] * len(codes) and len(list((folder / "out" / "images").iterdir())) == items
            rates[count] = items / elapsed
            shutil.rmtree(folder)
    return {
        "items": items,
        "concurrency": concurrency,
        "sqlite_one_items_per_s": round(rates[0], 1),
        **{f"items_per_s_{n}": round(rates[n], 1) for n in (1, 2, 4)},
        **{f"ratio_{n}": round(rates[n] / rates[1], 2) for n in (2, 4)},
        "postgres_one_to_sqlite_one": round(rates[1] / rates[0], 2),
        "cores": os.cpu_count(),
    }


def batch_collection(items: int, out: Path) -> dict[str, Any]:
    """Batch mode's collection of one results file of `items` lines, each a 1.5 MB image in base64:
    one worker process decoding lines against the run's default (two per core)."""
    noise = Image.frombytes("RGB", (700, 700), random.Random(7).randbytes(700 * 700 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    row: dict[str, Any] = {"items": items, "image_mb": round(len(buffer.getvalue()) / 1e6, 2)}
    config = SimConfig(key="bench", image_bytes=buffer.getvalue(), batch_duration_s=0.1)
    with SimulatorThread(config) as sim:
        for label, workers in (("one", 1), ("all", None)):
            folder = _fresh(out / f"batch-{label}")
            batch = {"poll_interval_s": 0.05, "max_requests": items, "workers": workers}
            provider = {"name": "g", "protocol": "gemini", "mode": "batch", "base_url": sim.origin}
            path = manifest(
                folder, items, 8, providers=[{**provider, "api_key_env": "IMAGE_API_KEY"}], batch=batch
            )
            run = measured("run", path, base_url=sim.base_url)
            assert run["exit"] == 0, run
            row[f"collect_s_{label}"] = run["result"]["providers"]["g"]["collect_s"]
            row[f"rss_mb_{label}"] = run["rss_mb"]
    row["cores"] = os.cpu_count()
    row["speedup"] = round(row["collect_s_one"] / row["collect_s_all"], 2)
    row["lines_per_s_all"] = round(items / row["collect_s_all"], 1)
    return row


def _per_item(run: dict[str, Any], items: int) -> float:
    return round(run["cpu_s"] * 1000 / items, 2)


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--only", help="comma-separated scenarios (default: all, into latest.json)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="working folder (default: output/bench)"
    )
    args = parser.parse_args()
    sizes = (
        ([200], [300], [1_000, 5_000], [100], [60], [200], [20])
        if args.quick
        else ([3_000], [5_000], [10_000, 100_000, 1_000_000], [600], [600], [3_000], [300])
    )
    report: dict[str, Any] = {}
    for name, scenario, size in (
        ("latency_bound", latency_bound, sizes[0][0]),
        ("overhead_bound", overhead_bound, sizes[1][0]),
        ("scale", scale, sizes[2]),
        ("cap", cap_efficiency, sizes[3][0]),
        ("quota", quota_efficiency, sizes[4][0]),
        ("workers", workers, sizes[5][0]),
        ("batch_collection", batch_collection, sizes[6][0]),
    ):
        if args.only and name not in args.only.split(","):
            continue
        if name == "workers" and postgres_bin() is None:
            print("workers: skipped, PostgreSQL is not installed (.ci/run installs it)", flush=True)
            continue
        report[name] = scenario(size, args.out)  # type: ignore[operator]
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    if args.only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2))
    print(render(report))


def render(report: dict[str, Any]) -> str:
    lat, ovh = report["latency_bound"], report["overhead_bound"]
    lines = [
        "scenario        items  items/s  figure                                    target",
        f"latency-bound   {lat['items']:>5}  {lat['items_per_s']:>7}  "
        f"efficiency {lat['efficiency']:<31} >= 0.95",
        f"overhead-bound  {ovh['items']:>5}  {ovh['items_per_s']:>7}  "
        f"{ovh['ratio_to_ceiling']} of a bare client "
        f"({ovh['ceiling_items_per_s']}/s){'':<7} >= 0.5",
        f"  our CPU {lat['cpu_ms_per_item']} ms/item (latency), {ovh['cpu_ms_per_item']} ms/item (overhead); "
        f"peak RSS {ovh['peak_rss_mb']} MB",
        f"  simulator CPU: {lat['sim_cpu_s']} s (latency run), {ovh['sim_cpu_s_ours']} s (ours), "
        f"{ovh['sim_cpu_s_ceiling']} s (bare client)",
        f"promptness p99 (URL received -> download start): {lat['download_wait_p99_ms']} ms (latency), "
        f"{ovh['download_wait_p99_ms']} ms (overhead)",
        "scale      items  fresh plan s  plan RSS MB  working RSS MB  done rerun s  rerun RSS MB",
    ]
    cap, quota = report["cap"], report["quota"]
    tail = [
        f"cap efficiency    {cap['items']:>5} items  {cap['efficiency']} of {cap['cap']} in flight / latency,"
        f" 429 share {cap['share_429']:.1%}, peak in flight {cap['peak_in_flight']}   target >= 0.9, <= 3%",
        f"quota efficiency  {quota['items']:>5} items  {quota['efficiency']} of the quota's least time"
        f" ({quota['per_minute']}/min, quota {quota['quota_per_minute']}/min),"
        f" 429 share {quota['share_429']:.1%}   target >= 0.9",
    ]
    if "workers" in report:
        w = report["workers"]
        tail.append(
            f"workers           {w['items']:>5} items  1 / 2 / 4 workers (PostgreSQL, local output):"
            f" {w['items_per_s_1']} / {w['items_per_s_2']} / {w['items_per_s_4']} items/s,"
            f" ratio to one 1 / {w['ratio_2']} / {w['ratio_4']} on {w['cores']} cores;"
            f" one on SQLite {w['sqlite_one_items_per_s']}/s"
        )
    if "batch_collection" in report:
        b = report["batch_collection"]
        tail.append(
            f"batch collection  {b['items']:>5} lines of {b['image_mb']} MB images:"
            f" {b['collect_s_one']} s with one worker process, {b['collect_s_all']} s with two per core"
            f" ({b['cores']} cores): x{b['speedup']}, {b['lines_per_s_all']} lines/s,"
            f" peak RSS {b['rss_mb_all']} MB"
        )
    for row in report["scale"]:
        lines.append(
            f"        {row['items']:>8}  {row['fresh_plan_s']:>12}  {row['fresh_plan_rss_mb']:>11}  "
            f"{row['working_run_rss_mb']:>14}  {row['done_rerun_s']:>12}  {row['done_rerun_rss_mb']:>12}"
        )
    return "\n".join(lines + tail)


if __name__ == "__main__":
    main()
