"""`pipeline run --ray`: the same worker, N times, as tasks on a Ray cluster; one bar, one exit code.

Each task runs `pipeline run` (without `--ray`) in a subprocess of a Ray worker, so a task is exactly
the worker a Kubernetes Job or a SLURM array would start, and a task Ray retries on another node
(a lost node) is a worker that comes late: it takes over the dead one's items once their leases run
out. Keys, passwords and cloud credentials are never shipped through Ray: each node's environment
provides them (a local cluster inherits ours).

Without an address a local cluster is started for the run, bound to 127.0.0.1 with usage stats and
the dashboard off (Ray's token authentication stays on, its default), and shut down at the end. The
progress bar reads the shared state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.errors import ExitCode, ManifestError

POLL_S = 0.5
# Worse first (after a signal): storage, temporary (locked, providers down), fatal, usage, failed items.
SEVERITY = (ExitCode.STORAGE, ExitCode.TEMPORARY, ExitCode.FATAL, ExitCode.USAGE, ExitCode.FAILED)


def combined_exit(codes: Sequence[int]) -> int:
    """One exit code for the whole run: the most serious of the workers'."""
    signalled = [code for code in codes if code >= 128 or code < 0]
    if signalled:
        return 128 + abs(signalled[0]) if signalled[0] < 0 else signalled[0]
    for code in SEVERITY:
        if code in codes:
            return code
    return max(codes, default=0)


def run_on_ray(
    address: str | None,
    workers: int,
    argv: list[str],
    shared: bool,
    progress: Callable[[], None],
    on_failure: Callable[[int, str], None],
) -> int:
    """Run `pipeline <argv>` as `workers` Ray tasks; `progress()` is called while they run, and
    `on_failure(code, stderr tail)` for each worker that exits non-zero. `shared`: whether the state
    and the output can be reached from every node (PostgreSQL, object storage)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        # Ray's local-only mode (its default on macOS): the node's address is 127.0.0.1 and every
        # server binds it. Without it Ray 2.60 listens on all interfaces, even given 127.0.0.1.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
    except ImportError as exc:
        raise ManifestError([f"--ray needs Ray: pip install 'imagegen-pipeline[ray]' ({exc})"]) from exc
    local: dict[str, Any] = {} if address else {"include_dashboard": False}
    ray.init(address=address, log_to_driver=False, configure_logging=False, **local)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
        if len(nodes) > 1 and not shared:
            raise ManifestError(
                [
                    f"--ray: the cluster has {len(nodes)} nodes, and a SQLite state or a local output folder"
                    " is one machine's: use --state postgresql://... and an object-store --output"
                ]
            )
        task = ray.remote(num_cpus=0.1, max_retries=3, scheduling_strategy="SPREAD")(_worker)
        pending = [task.remote(argv) for _ in range(workers)]
        codes: list[int] = []
        while pending:
            ready, pending = ray.wait(pending, timeout=POLL_S)
            for code, said in ray.get(ready):
                codes.append(code)
                if code != 0:
                    on_failure(code, said)
            progress()
        return combined_exit(codes)
    finally:
        ray.shutdown()


def _worker(argv: list[str]) -> tuple[int, str]:
    """One worker, in a Ray task: `pipeline <argv>` in a subprocess; its exit code and what it said
    last on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv],
        check=False,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return done.returncode, done.stderr[-2000:]
