"""The command line: parses arguments, owns the terminal (progress, logs, summary) and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from pipeline.catalog import shipped
from pipeline.cluster import run_on_ray
from pipeline.core import RunCore, output_identity
from pipeline.errors import ExitCode, ManifestError, OutputLockedError
from pipeline.events import Event, EventKind
from pipeline.export import export_webdataset
from pipeline.locations import is_postgres
from pipeline.manifest import Keys, Manifest, json_schema, load_manifest
from pipeline.plan import TYPICAL_LATENCY_S, preferred_price, preview
from pipeline.recorder import STORAGE_ERRORS
from pipeline.report import write_report
from pipeline.run import RunPlan, RunRequest, execute, state_url_of, storage_options
from pipeline.state import State, open_state
from pipeline.storage import Store, is_local, open_store
from pipeline.summary import Summary

PROGRESS_UNKNOWN: tuple[type[Exception], ...] = (ManifestError, *STORAGE_ERRORS)
LOG_EVERY_S = 5.0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.command(args))
    except ManifestError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return ExitCode.USAGE
    except BrokenPipeError:  # the reader went away (`| head`): stop writing, as a SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OutputLockedError as exc:
        print(f"pipeline: {exc}", file=sys.stderr)
        return ExitCode.TEMPORARY
    except STORAGE_ERRORS as exc:  # the state or the output cannot be reached
        print(f"pipeline: cannot use the state or the output: {exc}", file=sys.stderr)
        return ExitCode.STORAGE
    except KeyboardInterrupt:  # before a run took over the signals: nothing was started
        print("pipeline: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="generate every item of a manifest (resumable)")
    run.add_argument("manifest", type=Path)
    run.add_argument(
        "--output", help="output folder or fsspec URL, e.g. s3://bucket/prefix (default: the manifest's)"
    )
    _where_options(run)
    run.add_argument("--concurrency", type=_positive, help="generation requests in flight at most")
    run.add_argument("--retry-failed", action="store_true", help="also retry items failed for good")
    run.add_argument("--dry-run", action="store_true", help="print the plan and its cost; send nothing")
    run.add_argument("--max-requests", type=_positive, help="send at most N generation requests")
    run.add_argument("--max-duration", type=_seconds, metavar="SECONDS", help="take no new items after this")
    run.add_argument("--grace-s", type=_seconds, default=30.0, help="on a stop, time for in-flight work")
    run.add_argument("--quiet", action="store_true", help="print only the summary and errors")
    run.add_argument("--log-format", choices=("text", "json"), default="text")
    run.add_argument(
        "--provider", action="append", metavar="NAME", help="use only this provider (repeatable)"
    )
    run.add_argument("--mode", choices=("online", "batch"), help="with online and batch providers: which")
    run.add_argument("--submit-only", action="store_true", help="batch: submit the jobs and exit")
    ray_help = "run --workers workers as Ray tasks (no ADDRESS: a local cluster on 127.0.0.1)"
    run.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=ray_help)
    run.add_argument("--workers", type=_positive, default=1, help="with --ray: how many workers")
    run.add_argument("--simulate", action="store_true", help="use the built-in provider simulator")
    run.add_argument("--sim-latency", type=float, default=0.0, metavar="SECONDS")
    run.set_defaults(command=_run)

    validate = commands.add_parser("validate", help="check a manifest; no request is made")
    validate.add_argument("manifest", type=Path)
    validate.set_defaults(command=_validate)

    status = commands.add_parser("status", help="what an output folder holds, and its last run")
    status.add_argument("target", metavar="OUTPUT|MANIFEST")
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")
    _where_options(status)
    status.set_defaults(command=_status)

    export = commands.add_parser("export", help="write an output as WebDataset shards or Hub-ready parquet")
    export.add_argument("target", metavar="OUTPUT|MANIFEST")
    _where_options(export)
    export.add_argument("--format", choices=("webdataset", "parquet"), default="webdataset")
    export.add_argument("--shard-size", type=_positive, default=1000, help="webdataset: samples per shard")
    export.add_argument("--shard-size-mb", type=float, default=500.0, help="parquet: MB per shard (about)")
    export.add_argument(
        "--license", default="other", help="parquet: the card's license (an SPDX id, or other)"
    )
    export.add_argument("--to", help="destination folder or URL (default: OUTPUT/webdataset)")
    export.set_defaults(command=_export)

    report = commands.add_parser("report", help="write OUTPUT/report.html, a page to review the images")
    report.add_argument("target", metavar="OUTPUT|MANIFEST")
    _where_options(report)
    report.set_defaults(command=lambda args: print(write_report(*_open_target(args))) or 0)

    models = commands.add_parser("models", help="list the image models known (with a manifest's models:)")
    models.add_argument("manifest", type=Path, nargs="?", help="also the models this manifest describes")
    models.add_argument("--json", action="store_true", help="the entries as JSON")
    models.set_defaults(command=_models)

    schema = commands.add_parser("schema", help="print the manifest's JSON Schema")
    schema.set_defaults(command=lambda args: print(json.dumps(json_schema(), indent=2)) or 0)

    sim = commands.add_parser("simulate", help="serve the provider simulator until interrupted")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--image-port", type=int, default=0)
    sim.add_argument("--key", help="the key to expect (default: $IMAGE_API_KEY when set, else sim-key)")
    sim.add_argument("--latency", type=float, default=1.0)
    sim.add_argument("--jitter", type=float, default=0.5)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--image-scale", type=int, default=1, help="divide image sizes by this")
    sim.add_argument("--distinct-images", type=int, default=0, help="draw only N pictures (cheap)")
    sim.add_argument(
        "--max-in-flight", type=int, default=0, help="a hidden cap: 429 above N requests in flight"
    )
    sim.add_argument(
        "--quota", type=int, default=0, help="at most N requests per --quota-window (429 + Retry-After)"
    )
    sim.add_argument("--quota-window", type=float, default=60.0, metavar="SECONDS")
    sim.add_argument(
        "--rate-limit-headers", action="store_true", dest="headers", help="send x-ratelimit-* headers"
    )
    for fault in ("429", "429_retry_after", "500", "reset", "refusal", "truncate"):
        sim.add_argument(f"--rate-{fault.replace('_', '-')}", type=float, default=0.0, dest=f"rate_{fault}")
    sim.set_defaults(command=_simulate)
    return parser


def _where_options(parser: argparse.ArgumentParser) -> None:
    state_help = "postgresql://user@host:port/db (default: the manifest's, else state.db in the output)"
    parser.add_argument("--state", metavar="URL", help=state_help)
    option_help = "for the output's fsspec filesystem, e.g. endpoint_url=http://... (repeatable)"
    parser.add_argument(
        "--storage-option", action="append", metavar="KEY=VALUE", default=[], help=option_help
    )


def _open_target(args: argparse.Namespace) -> tuple[Store, State]:
    """The output (given as itself, or as the manifest that names it) and its state, to read."""
    target = Path(args.target)
    manifest = load_manifest(target) if is_local(args.target) and target.is_file() else None
    url = manifest.output_url(target) if manifest else args.target.rstrip("/") or args.target
    store = open_store(url, storage_options(manifest, args.storage_option))
    return store, open_state(
        state_url_of(args.state, manifest), output_identity(store), store.local, readonly=True
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _load(path: Path, quiet: bool = False, keys: Keys | None = None) -> Manifest:
    """The manifest, its warnings shown on stderr (unless quiet)."""
    manifest = load_manifest(path, keys)
    for warning in [] if quiet else manifest.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return manifest


def _models(args: argparse.Namespace) -> int:
    catalog = _load(args.manifest).catalog if args.manifest else shipped()
    if args.json:
        entries = {
            name: catalog.entries[name].model_dump(mode="json", exclude_defaults=True)
            for name in catalog.entries
        }
        print(json.dumps(entries, indent=2))
        return 0
    today = date.today()
    for name in catalog.entries:
        model = catalog.find(name)
        assert model is not None
        entry = model.entry
        sizes = ", ".join(model.image_sizes) or "-"
        ratios = f"{len(model.aspect_ratios)} ratios" + (", any within bounds" if entry.any_ratio else "")
        price = model.price(None)
        passed = " (passed)" if entry.shutdown and entry.shutdown <= today else ""
        life = f"announced shutdown {entry.shutdown}{passed}" if entry.shutdown else ""
        life += f" -> {entry.replacement}" if entry.replacement and life else ""
        priced = f"${price:g}" if price is not None else "price unknown"
        protocols = ", ".join(entry.protocols)
        print(f"{name:<32} {ratios:<28} sizes {sizes:<16} {priced:<14} {protocols:<34} {life}".rstrip())
    return 0


def _validate(args: argparse.Namespace) -> int:
    manifest = _load(args.manifest)
    print(f"{args.manifest}: valid: {manifest.expanded_jobs} jobs, {manifest.total_items} items")
    return 0


def _run(args: argparse.Namespace) -> int:
    keys = not (args.dry_run or args.simulate or args.ray is not None)  # a run that sends them
    checked = Keys(os.environ, tuple(args.provider or ()), args.mode) if keys else None
    manifest = _load(args.manifest, quiet=args.quiet or args.log_format == "json", keys=checked)
    request = RunRequest(
        output=args.output,
        state=args.state,
        storage_options=tuple(args.storage_option),
        concurrency=args.concurrency,
        providers=tuple(args.provider or ()),
        mode=args.mode,
        submit_only=args.submit_only,
        retry_failed=args.retry_failed,
        max_requests=args.max_requests,
        max_duration_s=args.max_duration,
        grace_s=args.grace_s,
        simulate=args.simulate,
        sim_latency_s=args.sim_latency,
    )
    plan = RunPlan.resolve(args.manifest, manifest, request, keys=keys)
    if args.dry_run:
        return _dry_run(args, plan)
    if args.ray is not None:
        return _run_on_ray(args, plan)
    return asyncio.run(_run_with(args, plan))


def _run_on_ray(args: argparse.Namespace, plan: RunPlan) -> int:
    """`--ray`: the same run as `--workers` tasks on a Ray cluster, one bar and one exit code."""
    state_url, output = plan.state_url, plan.store
    if not is_postgres(state_url) and args.workers > 1:
        raise ManifestError(
            [f"--workers {args.workers}: a SQLite state is one worker's: use --state postgresql://..."]
        )
    quiet = args.quiet or args.log_format == "json"
    bar = _RayProgress(plan.manifest.total_items, state_url, output, quiet)
    try:
        code = run_on_ray(
            args.ray or None,
            args.workers,
            plan.worker_argv(),
            is_postgres(state_url) and output.local is None,
            bar.update,
            bar.failed,
        )
    finally:
        bar.close()
    if args.log_format == "json":
        print(json.dumps({"event": "summary", "workers": args.workers, "exit_code": code}), flush=True)
    else:
        print(f"{args.workers} worker(s) on Ray: exit {code}", file=sys.stderr if code else sys.stdout)
    return code


class _RayProgress:
    """The workers' combined progress, read from the shared state: a bar on a terminal, else a line
    every few seconds."""

    def __init__(self, total: int, state_url: str | None, output: Store, quiet: bool) -> None:
        self._total, self._state_url, self._output, self._quiet = total, state_url, output, quiet
        self._bar: tqdm[Any] | None = None
        if not quiet and sys.stdout.isatty():
            self._bar = tqdm(total=total, unit="img", dynamic_ncols=True)
        self._last = time.monotonic()

    def update(self) -> None:
        if self._quiet or (self._bar is None and time.monotonic() - self._last < LOG_EVERY_S):
            return
        self._last = time.monotonic()
        try:
            with open_state(
                self._state_url, output_identity(self._output), self._output.local, readonly=True
            ) as state:
                counts = state.counts()
        except PROGRESS_UNKNOWN:
            return  # no state yet (the first worker is starting), or not reachable now: next time
        if self._bar is not None:
            self._bar.n = counts["done"] + counts["failed"]
            self._bar.set_postfix(failed=counts["failed"], refresh=False)
            self._bar.refresh()
        else:
            print(f"progress: {counts['done']}/{self._total} done, {counts['failed']} failed", flush=True)

    def failed(self, code: int, said: str) -> None:
        lines = said.strip().splitlines()
        print(f"a worker exited {code}{': ' + lines[-1] if lines else ''}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self.update()
            self._bar.close()


PLAN_NOTES = {
    "new": "to generate",
    "changed": "prompt, aspect ratio or model edited: regenerate",
    "retry": "failed or unfinished last time: generate again",
    "resume": "generated before a crash: adopt the file on disk, else generate",
    "download": "URL still fresh: download, no new payment",
    "done": "",
    "failed": "failed for good (--retry-failed tries again)",
}


def _dry_run(args: argparse.Namespace, plan: RunPlan) -> int:
    manifest, output, mode = plan.manifest, plan.store, plan.mode
    try:
        state: State | None = open_state(plan.state_url, output_identity(output), output.local, readonly=True)
    except ManifestError:
        state = None  # it never ran
    counted = preview(manifest, output, state, args.retry_failed, mode)
    if args.log_format == "json":
        print(json.dumps({"event": "plan", "output": output.url, **counted.as_dict()}))
        return 0
    print(f"plan for {args.manifest} -> {output.url} (nothing is sent)")
    print(f"  {'items':<9}{counted.items:>9}")
    for label, note in PLAN_NOTES.items():
        print(f"  {label:<9}{counted.steps[label]:>9}  {note}".rstrip())
    print(f"  {'orphaned':<9}{counted.orphaned:>9}  in the output, no longer in the manifest (kept)")
    price = preferred_price(manifest, mode)
    price_text = (
        f"${price}/image" if price is not None else "list prices" + (" less half" if mode == "batch" else "")
    )
    print(
        f"paid requests <= {counted.paid_requests}, about ${counted.cost:,.2f}"
        f" at {price_text}, about {_duration(counted.duration_s)}"
        f" at concurrency {manifest.generation_limit} and {TYPICAL_LATENCY_S:.0f} s per image"
    )
    if counted.unpriced:
        print(
            f"price unknown for {counted.unpriced} of them: {manifest.item_model} has no price in the"
            " catalog (set price_per_image, or describe the model under models:)"
        )
    if counted.jobs is not None:
        print(
            f"batch mode: {counted.jobs} new job(s) of up to {manifest.batch.max_requests} items;"
            f" {counted.steps['in_batch']} items in submitted jobs (24 h target turnaround)"
        )
    return 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _status(args: argparse.Namespace) -> int:
    store, state = _open_target(args)
    with state:
        counts, last, jobs, workers = state.counts(), state.last_run(), state.batch_jobs(), state.workers()
        counts["done_by_model"] = state.done_by_model()
    output = store.url
    providers = ((last or {}).get("summary") or {}).get("providers") or {}
    if args.json:
        print(
            json.dumps(
                {
                    "output": output,
                    **counts,
                    "providers": providers,
                    "batches": jobs,
                    "last_run": last,
                    "workers": workers,
                }
            )
        )
        return 0
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts["failed_by_reason"].items()))
    print(f"{output}: {counts['items']} items recorded")
    pending = f", not started {counts['pending']}" if counts["pending"] else ""
    print(
        f"  done {counts['done']}, failed {counts['failed']}{f' ({reasons})' if reasons else ''},"
        f" in progress {counts['in_progress']}{pending}"
    )
    models = counts["done_by_model"]
    if len(models) > 1:
        print("  images by model: " + ", ".join(f"{name} {n}" for name, n in sorted(models.items())))
    if workers or state.shared:
        print(f"live workers: {len(workers)}")
    for worker in workers:
        print(
            f"  {worker['worker']}: up {_duration(worker['age_s'])}, {worker['leases']} items leased,"
            f" last heartbeat {worker['heartbeat_s']} s ago"
        )
    if last:
        ended = (
            f"ended {last['ended_at']}, exit {last['exit_code']}"
            if last["ended_at"]
            else "still running or killed"
        )
        print(f"last run #{last['run']}: started {last['started_at']}, {ended}")
    for name, figures in providers.items():
        if "requests" in figures:
            print(format_provider(name, figures))
    for job in jobs:
        print(
            f"batch {job['display_name']} ({job['name'] or 'not created yet'}): {job['stage']}"
            f" ({job['remote_state'] or '-'}), {job['items']} items, {job['done']} done,"
            f" {job['failed']} failed, {_duration(job['age_s'])} old"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    store, state = _open_target(args)
    target, prefix = (
        (open_store(args.to, storage_options(None, args.storage_option)), "")
        if args.to
        else (store, f"{args.format}/")
    )
    if args.format == "parquet":
        return _export_parquet(args, store, state, target, prefix)
    shards = export_webdataset(store, state, target, prefix, args.shard_size)
    print(f"{len(shards)} shard(s) of up to {args.shard_size} samples in {target.url}/{prefix}")
    return 0


def _export_parquet(args: argparse.Namespace, store: Store, state: State, target: Store, prefix: str) -> int:
    try:
        from pipeline.parquet import export_parquet
    except ImportError as exc:
        raise ManifestError(
            [f"--format parquet needs pyarrow: pip install 'imagegen-pipeline[parquet]' ({exc})"]
        ) from exc
    total = state.counts()["done"]  # the state is closed by the export
    bar = tqdm(total=total, unit="img", disable=not sys.stderr.isatty(), file=sys.stderr)
    try:
        shards = export_parquet(store, state, target, prefix, args.shard_size_mb, args.license, bar.update)
    finally:
        bar.close()
    where = f"{target.url}/{prefix}".rstrip("/")
    print(
        f"{len(shards)} parquet shard(s) and a dataset card in {where}/"
        f" (publish: hf upload REPO {where} --repo-type dataset)"
    )
    return 0


async def _run_with(args: argparse.Namespace, plan: RunPlan) -> int:
    display = _Display(args.quiet, args.log_format, sys.stdout)
    loop = asyncio.get_running_loop()
    ticker: list[asyncio.Task[None]] = []

    def started(core: RunCore) -> None:
        for signum, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
            loop.add_signal_handler(signum, _on_signal(core, display, name, signum))
        display.start(core.summary, plan.store.url)
        ticker.append(asyncio.create_task(display.tick(core.summary)))

    try:
        summary = await execute(plan, display.event, started)
    finally:
        for task in ticker:
            task.cancel()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    display.finish(summary, plan.store.url)
    return summary.exit_code


def _on_signal(core: RunCore, display: _Display, name: str, signum: int) -> Callable[[], None]:
    def handle() -> None:
        display.note(f"{name}: finishing in-flight work (again to stop at once)")
        core.interrupt(signum)

    return handle


class _Display:
    """Progress as a tqdm bar on a terminal, else a plain line every few seconds; or JSON lines."""

    def __init__(self, quiet: bool, log_format: str, out: TextIO) -> None:
        self._quiet, self._json, self._out = quiet, log_format == "json", out
        self._bar: tqdm[Any] | None = None
        self._last_log = time.monotonic()

    def start(self, summary: Summary, output: str) -> None:
        self._emit(
            "run_start",
            f"{summary.total} items -> {output}",
            total=summary.total,
            output=output,
        )
        if not self._quiet and not self._json and self._out.isatty():
            self._bar = tqdm(total=summary.total, unit="img", dynamic_ncols=True, file=self._out)

    def event(self, event: Event) -> None:
        kind = event.kind
        if kind.about_provider:
            what = {
                EventKind.PROVIDER_DISABLED: "disabled for the rest of the run",
                EventKind.PROVIDER_DOWN: "down",
                EventKind.PROVIDER_REROUTED: "re-routes the model",
            }[kind]
            self._emit(
                kind,
                f"warning: provider {event.provider} {what}: {event.message}",
                always=True,
                err=True,
                provider=event.provider,
                message=event.message,
            )
        elif kind.about_batch:
            warning = kind is EventKind.BATCH_WARNING
            text = f"batch {kind.removeprefix('batch_')}: {event.message}"
            self._emit(
                kind, text, always=warning, err=warning, provider=event.provider, message=event.message
            )
        elif kind in (EventKind.FAILED, EventKind.WARNING):
            self._emit(
                f"item_{kind}",
                f"{kind}: {event.item}: {event.message}",
                err=True,
                always=kind is EventKind.FAILED,
                item=event.item,
                message=event.message,
            )
        elif kind is EventKind.DONE and self._json:
            self._emit("item_done", "", item=event.item, file=event.message, provider=event.provider or None)

    def note(self, text: str) -> None:
        self._emit("note", text, always=True, err=True, message=text)

    async def tick(self, summary: Summary) -> None:
        while True:
            await asyncio.sleep(0.25)
            if self._bar is not None:
                self._bar.n = summary.done + summary.skipped + sum(summary.failed.values())
                self._bar.set_postfix(
                    failed=sum(summary.failed.values()), requests=summary.requests, refresh=False
                )
                self._bar.refresh()
            elif time.monotonic() - self._last_log >= LOG_EVERY_S:
                self._last_log = time.monotonic()
                finished = summary.done + summary.skipped
                self._emit(
                    "progress",
                    f"progress: {finished}/{summary.total} done, "
                    f"{sum(summary.failed.values())} failed, {summary.requests} requests",
                    done=finished,
                    total=summary.total,
                )

    def finish(self, summary: Summary, output: str) -> None:
        if self._bar is not None:
            self._bar.n = summary.done + summary.skipped + sum(summary.failed.values())
            self._bar.close()
        if self._json:
            print(json.dumps({"event": "summary", **summary.as_dict()}), file=self._out, flush=True)
            return
        print(format_summary(summary, output), file=self._out, flush=True)

    def _emit(self, event: str, text: str, always: bool = False, err: bool = False, **fields: Any) -> None:
        """One event: a JSON line, or text (diagnostics to stderr); `--quiet` keeps only `always`."""
        if self._quiet and not always:
            return
        if self._json:
            print(
                json.dumps({"event": event, "time": round(time.time(), 3), **fields}, ensure_ascii=False),
                file=self._out,
                flush=True,
            )
        elif text and (always or not self._quiet):
            if self._bar is not None:
                self._bar.write(text, file=self._out)
            else:
                print(text, file=sys.stderr if err else self._out, flush=True)


def format_summary(summary: Summary, output: str) -> str:
    failed = sum(summary.failed.values())
    reasons = ", ".join(f"{k} {v}" for k, v in summary.failed.most_common())
    retries = sum(summary.retries.values())
    lines = [
        f"done {summary.done + summary.skipped} of {summary.total} "
        f"(new {summary.done}, already done {summary.skipped}), "
        f"failed {failed}{f' ({reasons})' if reasons else ''}, remaining {summary.remaining}",
        f"requests {summary.requests}, downloads {summary.downloads}, retries {retries}, "
        f"warnings {summary.warnings}, elapsed {summary.elapsed_s:.1f}s",
        f"output: {output}/ (images/, metadata.jsonl, failures.jsonl)",
    ]
    if summary.handed_over:
        lines.insert(1, f"handed over to other workers: {summary.handed_over} (this worker's leases ran out)")
    online = {name: p for name, p in summary.providers.items() if "requests" in p}
    if len(online) > 1 or any(p["disabled"] for p in online.values()):
        lines[-1:-1] = [format_provider(name, figures) for name, figures in online.items()]
    for name, p in summary.providers.items():
        if "batch_jobs" in p:
            jobs = ", ".join(f"{k} {v}" for k, v in p["batch_jobs"].items())
            read = f"; results read in {p['collect_s']:.1f} s" if p.get("collect_s") else ""
            lines.insert(-1, f"  {name}: batch jobs {jobs}{read}")
    if summary.storage:
        lines.insert(0, f"stopped: cannot write the output: {summary.storage}")
    elif summary.outage:
        lines.insert(0, f"stopped: every provider is down: {summary.outage}; rerun the same command later")
    elif summary.fatal:
        lines.insert(0, f"stopped: fatal provider error: {summary.fatal}; fix it and rerun the same command")
    elif summary.stopped:
        lines.insert(0, f"stopped early: {summary.stopped}; rerun the same command to finish")
    return "\n".join(lines)


def format_provider(name: str, figures: dict[str, Any]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(figures["errors"].items()))
    text = (
        f"  {name}: requests {figures['requests']}, images {figures['images']},"
        f" refusals {figures['refusals']}, ${figures['cost_usd']:.2f}"
    )
    text += f", errors: {errors}" if errors else ""
    return text + (f"; DISABLED: {figures['disabled']}" if figures["disabled"] else "")


def _simulator_key(flag: str | None) -> tuple[str, str]:
    """The key the simulator expects (--key, else $IMAGE_API_KEY, else sim-key) and how to say which
    one without printing a key the user chose."""
    if flag:
        return flag, "(expects the key given with --key)"
    exported = os.environ.get("IMAGE_API_KEY")
    if exported:
        return exported, "(expects the key in $IMAGE_API_KEY)"
    return "sim-key", "IMAGE_API_KEY=sim-key"


def _simulate(args: argparse.Namespace) -> int:
    from pipeline.simulator import SimConfig, Simulator  # only this command serves it

    rates = {k: v for k, v in vars(args).items() if k.startswith("rate_")}
    key, said = _simulator_key(args.key)
    config = SimConfig(
        key=key,
        latency_s=args.latency,
        jitter_s=args.jitter,
        seed=args.seed,
        image_scale=args.image_scale,
        distinct_images=args.distinct_images,
        max_in_flight=args.max_in_flight,
        quota=args.quota,
        quota_window_s=args.quota_window,
        rate_limit_headers=args.headers,
        **rates,
    )

    async def serve() -> None:
        simulator = Simulator(config)
        await simulator.start(args.host, args.port, args.image_port)
        print(
            f"simulator: IMAGE_API_BASE_URL={simulator.base_url} {said}; native: {simulator.origin}",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await simulator.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        return 0
    return 0
