"""A run, built without the command line: `RunPlan.resolve(source, manifest, request)` then `execute`.

`resolve` turns a manifest and what the caller asks for (`RunRequest`: the CLI's flags, or a test's)
into everything a run needs, or every problem at once (`ManifestError`): the output store, the state
URL, the mode (online or batch), the providers chosen and their keys from the environment, the
budgets. `execute` runs it (starting the built-in simulator first when asked) and returns the
`Summary`; `worker_argv` is the same run as a `pipeline run` command line, for the Ray launcher.
The CLI, the Ray launcher and the tests all go through here; the CLI keeps the terminal and exit
codes.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core import Endpoint, RunCore, RunOptions
from pipeline.errors import ManifestError
from pipeline.events import Event
from pipeline.locations import check_state_url, credentials_in, is_postgres
from pipeline.manifest import Manifest, ProviderSpec
from pipeline.secret import Secret
from pipeline.storage import Store, open_store
from pipeline.summary import Summary

Mode = Literal["online", "batch"]


@dataclass(frozen=True)
class RunRequest:
    """What the caller asks of a run, over what the manifest says."""

    output: str | None = None  # a folder or fsspec URL (default: the manifest's)
    state: str | None = None  # postgresql://... or a SQLite file (default: the manifest's)
    storage_options: tuple[str, ...] = ()  # KEY=VALUE pairs over the manifest's storage_options
    concurrency: int | None = None
    providers: tuple[str, ...] = ()  # use only these (default: all of the run's mode)
    mode: Mode | None = None  # default: batch when the pool has a batch provider
    submit_only: bool = False
    retry_failed: bool = False
    max_requests: int | None = None
    max_duration_s: float | None = None
    grace_s: float = 30.0
    simulate: bool = False  # the built-in simulator instead of the providers' endpoints
    sim_latency_s: float = 0.0


@dataclass(frozen=True)
class RunPlan:
    source: Path
    manifest: Manifest
    request: RunRequest
    store: Store
    state_url: str | None
    mode: Mode
    specs: list[ProviderSpec]  # the providers chosen, in pool order
    endpoints: list[Endpoint] = field(default_factory=list)  # empty when simulated: made at start

    @classmethod
    def resolve(
        cls,
        source: Path,
        manifest: Manifest,
        request: RunRequest,
        environ: Mapping[str, str] = os.environ,
        *,
        keys: bool = True,
    ) -> RunPlan:
        """The run, resolved. `keys=False` leaves the providers' endpoints and keys unresolved: a dry
        run sends nothing, and a Ray driver's workers resolve their own."""
        if request.concurrency:
            manifest = manifest.model_copy(update={"concurrency": request.concurrency})
        state_url = state_url_of(request.state, manifest)
        mode = mode_of(manifest, request.mode)
        if is_postgres(state_url) and mode == "batch":
            raise ManifestError([f"{source}: batch mode runs as one worker on a SQLite state, for now"])
        specs = chosen(source, manifest, request.providers, mode)
        url = request.output.rstrip("/") if request.output else manifest.output_url(source)
        spool = f"{os.getpid()}-{secrets.token_hex(4)}" if is_postgres(state_url) else ""  # one per worker
        store = open_store(url, storage_options(manifest, request.storage_options), spool)
        keys = keys and not request.simulate
        endpoints = resolve_endpoints(source, manifest, specs, environ) if keys else []
        return cls(source, manifest, request, store, state_url, mode, specs, endpoints)

    def options(self, endpoints: list[Endpoint] | None = None) -> RunOptions:
        request = self.request
        return RunOptions(
            endpoints or self.endpoints,
            retry_failed=request.retry_failed,
            max_requests=request.max_requests or self.manifest.max_requests,
            max_duration_s=request.max_duration_s,
            grace_s=request.grace_s,
            state_url=self.state_url,
            submit_only=request.submit_only,
        )

    def core(self, on_event: Callable[[Event], None], endpoints: list[Endpoint] | None = None) -> RunCore:
        """The run's core for its mode, not started."""
        from pipeline.batch import BatchRunner
        from pipeline.runner import Runner

        kind = BatchRunner if self.mode == "batch" else Runner
        return kind(self.manifest, self.store, self.options(endpoints), on_event)

    def worker_argv(self) -> list[str]:
        """This run as one worker's `pipeline run`, paths made absolute (a Ray task's working
        directory is Ray's)."""
        request, store = self.request, self.store
        output = str(store.local.resolve()) if store.local is not None else store.url
        argv = ["run", str(self.source.resolve()), "--quiet", "--output", output]
        if self.state_url:
            state = self.state_url if is_postgres(self.state_url) else str(Path(self.state_url).resolve())
            argv += ["--state", state]
        for pair in request.storage_options:
            argv += ["--storage-option", pair]
        flags = {
            "--concurrency": request.concurrency,
            "--max-requests": request.max_requests,
            "--max-duration": request.max_duration_s,
            "--grace-s": request.grace_s,
            "--mode": request.mode,
            "--sim-latency": request.sim_latency_s if request.simulate else None,
        }
        for flag, value in flags.items():
            argv += [flag, str(value)] if value is not None else []
        argv += [f"--provider={name}" for name in request.providers]
        switches = (("--retry-failed", request.retry_failed), ("--simulate", request.simulate))
        return argv + [flag for flag, on in switches if on]


async def execute(
    plan: RunPlan,
    on_event: Callable[[Event], None] = lambda event: None,
    started: Callable[[RunCore], None] = lambda core: None,
) -> Summary:
    """Run the plan; `started(core)` is called before the run begins (to hand it signals, a display)."""
    if not plan.request.simulate:
        core = plan.core(on_event)
        started(core)
        return await core.run()
    from pipeline.simulator import SimConfig, Simulator

    key = f"sim-{secrets.token_hex(8)}"
    latency = plan.request.sim_latency_s
    simulator = Simulator(SimConfig(key=key, latency_s=latency, jitter_s=latency / 2))
    await simulator.start()
    try:
        endpoints = [
            Endpoint(spec, simulator.origin if spec.protocol == "gemini" else simulator.base_url, Secret(key))
            for spec in plan.specs
        ]
        core = plan.core(on_event, endpoints)
        started(core)
        return await core.run()
    finally:
        await simulator.stop()


def state_url_of(flag: str | None, manifest: Manifest | None) -> str | None:
    url: str | None = flag or (manifest.state if manifest else None)
    problem = check_state_url(url) if url else None
    if problem:
        raise ManifestError([f"--state: {problem}"])
    return url


def storage_options(manifest: Manifest | None, pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The manifest's storage_options, and KEY=VALUE pairs over them (VALUE read as YAML)."""
    options = dict(manifest.storage_options) if manifest else {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ManifestError([f"--storage-option {pair}: expected KEY=VALUE"])
        if credentials_in({key: None}):
            raise ManifestError(
                [
                    f"--storage-option {key}: credentials come from the environment, not the"
                    " command line (where other users' `ps` sees them)"
                ]
            )
        options[key] = yaml.safe_load(value) if value else ""
    return options


def mode_of(manifest: Manifest, asked: Mode | None) -> Mode:
    if asked:
        return asked
    return "batch" if any(spec.mode == "batch" for spec in manifest.pool()) else "online"


def chosen(source: Path, manifest: Manifest, names: tuple[str, ...], mode: Mode) -> list[ProviderSpec]:
    """The providers this run uses: those named (all when none is), of the run's mode."""
    pool = manifest.pool()
    known = [spec.name for spec in pool]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ManifestError(
            [f"--provider {name}: no such provider (the manifest has {', '.join(known)})" for name in unknown]
        )
    specs = [spec for spec in pool if (not names or spec.name in names) and spec.mode == mode]
    if not specs:
        raise ManifestError([f"{source}: no {mode} provider to use (see providers[].mode and --mode)"])
    return specs


def resolve_endpoints(
    source: Path, manifest: Manifest, specs: list[ProviderSpec], environ: Mapping[str, str]
) -> list[Endpoint]:
    """Each provider with its base URL and key from the manifest and the environment, or every
    problem at once."""
    problems, endpoints = [], []
    places = {spec.name: i for i, spec in enumerate(manifest.pool())}
    for spec in specs:
        place = "api" if not manifest.providers else f"providers[{places[spec.name]}]"
        base_url = spec.default_base_url or environ.get("IMAGE_API_BASE_URL", "")
        if not base_url:
            problems.append(f"{source}: {place}.base_url: not set, and IMAGE_API_BASE_URL is empty")
        key = environ.get(spec.key_env, "")
        if not key:
            problems.append(
                f"{source}: {place}.api_key_env: environment variable {spec.key_env} is not set"
                " (or use --simulate)"
            )
        endpoints.append(Endpoint(spec, base_url.rstrip("/"), Secret(key)))
    if problems:
        raise ManifestError(problems)
    return endpoints
