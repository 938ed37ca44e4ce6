"""The pipeline's errors. Each says whether trying again can help.

    PipelineError
    ├── ManifestError          bad manifest or usage; nothing was sent       (exit 2)
    ├── OutputLockedError      another run holds the output folder          (exit 75)
    ├── StorageError           the output cannot be written (disk full...)  (exit 74)
    ├── LeaseLost              another worker took the item over: write nothing for it
    ├── NoProviderLeft         every provider is out for the run; items stay as they were
    │                          (exit 3; exit 75 when one is only down: an outage, try later)
    └── ItemError              one item's attempt failed; `retryable` says if another may help
        ├── RetryableError     5xx, 429, 408, timeouts, resets, empty bodies; may carry `retry_after`
        │   └── DownloadError  the image host failed in a way worth retrying (5xx, truncated, not an image)
        ├── UrlGoneError       the image URL expired or vanished: only a new generation helps
        ├── PermanentError     this item will fail the same way again (400, 422, bad reply)
        │   ├── RefusalError   the provider's safety review refused the prompt
        │   └── NoImageError   a reply with no image in it (retried once by the runner)
        └── FatalError         no item can succeed on this provider: bad key, no quota, a daily
                               cap, a retired model; the pool takes it out and tries another

aiohttp's exceptions become these in exactly one place per module (``raise ... from exc``).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `pipeline` exits with; a signal's run exits 128 + its number."""

    OK = 0
    FAILED = 1  # some items failed (a plain rerun retries the retryable ones)
    USAGE = 2  # a bad manifest or command line: nothing was sent
    FATAL = 3  # no provider can serve the run (key, quota, model): fix it, rerun; items stay resumable
    STORAGE = 74  # the output or the state cannot be written or read
    TEMPORARY = 75  # try later: another run holds the output, or every provider is down (an outage)


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""


class ManifestError(PipelineError):
    """The manifest (or the command line) is wrong; `problems` lists every finding."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class OutputLockedError(PipelineError):
    """Another live run holds the output folder's lock."""


class StorageError(PipelineError):
    """Writing to the output folder failed: the run stops; what was recorded stays resumable."""


class LeaseLost(PipelineError):
    """Another worker took this item over (our lease ran out): record and overwrite nothing for it."""


class NoProviderLeft(PipelineError):
    """Every provider of the pool is out for the rest of the run. `temporary`: at least one of them is
    only down (no success for `max_outage_s`), so trying later may work."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


class ItemError(PipelineError):
    """One attempt at one item failed. `kind` is the failure's name in failures.jsonl."""

    retryable = False
    kind = "error"

    def __init__(self, message: str, *, retry_after: float | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        if kind:
            self.kind = kind


class RetryableError(ItemError):
    retryable = True
    kind = "transient"


class DownloadError(RetryableError):
    kind = "download"


class UrlGoneError(ItemError):
    kind = "url_gone"


class PermanentError(ItemError):
    kind = "invalid_request"


class RefusalError(PermanentError):
    kind = "refusal"


class NoImageError(PermanentError):
    kind = "no_image"


class FatalError(ItemError):
    kind = "fatal"


# Failures a rerun leaves alone unless asked (`--retry-failed`): trying again would fail the same way.
PERMANENT_KINDS = frozenset({"invalid_request", "refusal", "no_image", "too_large", "bad_reference"})
