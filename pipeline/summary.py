"""What one run did, counted: the runners fill it in, the CLI prints it, the state keeps it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ExitCode
from pipeline.metrics import Histogram


@dataclass
class Summary:
    total: int = 0
    done: int = 0  # finished by this run
    skipped: int = 0  # already done before this run
    failed: Counter[str] = field(default_factory=Counter)  # items failed now, by reason
    requests: int = 0  # generation requests sent (each may be billed)
    retries: Counter[str] = field(default_factory=Counter)  # by error kind
    downloads: int = 0
    warnings: int = 0
    elapsed_s: float = 0.0
    handed_over: int = 0  # items another worker took over (this one's lease ran out)
    stopped: str | None = None  # why the run stopped taking new items early
    fatal: str | None = None  # no provider could serve the run (exit 3)
    outage: str | None = None  # every provider left was down (exit 75: try later)
    storage: str | None = None  # the output could not be written
    signal: int | None = None
    download_wait: Histogram = field(default_factory=Histogram)  # URL received -> download started
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)  # figures by provider
    size_mismatches: Counter[str] = field(default_factory=Counter)  # images of another size, by provider

    @property
    def remaining(self) -> int:
        return self.total - self.done - self.skipped - sum(self.failed.values()) - self.handed_over

    @property
    def exit_code(self) -> int:
        """The most serious outcome: a signal (128 + its number), storage, outage, fatal, failures."""
        if self.signal is not None:
            return 128 + self.signal
        if self.storage:
            return ExitCode.STORAGE
        if self.outage:
            return ExitCode.TEMPORARY
        if self.fatal:
            return ExitCode.FATAL
        return ExitCode.FAILED if self.failed else ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "skipped": self.skipped,
            "failed": dict(self.failed),
            "remaining": self.remaining,
            "requests": self.requests,
            "retries": dict(self.retries),
            "downloads": self.downloads,
            "warnings": self.warnings,
            "size_mismatches": dict(self.size_mismatches),
            "handed_over": self.handed_over,
            "elapsed_s": round(self.elapsed_s, 3),
            "stopped": self.stopped,
            "fatal": self.fatal,
            "outage": self.outage,
            "storage": self.storage,
            "providers": self.providers,
            "download_wait_ms": {
                "p50": self.download_wait.percentile(0.5),
                "p99": self.download_wait.percentile(0.99),
            },
            "exit_code": self.exit_code,
        }
