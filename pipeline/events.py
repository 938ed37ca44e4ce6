"""What a run reports while it works: the core emits `Event`s, the CLI shows them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EventKind(StrEnum):
    DONE = "done"  # an item's image is recorded durably (`message`: its file)
    FAILED = "failed"  # an item is recorded failed (`message`: kind: reason)
    RETRY = "retry"
    WARNING = "warning"  # about one item (a size mismatch, a lost lease)
    PROVIDER_DISABLED = "provider_disabled"  # out for the rest of the run (key, quota, model, outage)
    PROVIDER_DOWN = "provider_down"  # its circuit breaker opened: out for a cool-down
    PROVIDER_REROUTED = "provider_rerouted"  # its replies say another model made the images
    BATCH_SUBMITTED = "batch_submitted"
    BATCH_COLLECTED = "batch_collected"
    BATCH_ENDED = "batch_ended"  # failed, cancelled or expired: its items go back
    BATCH_WARNING = "batch_warning"

    @property
    def about_provider(self) -> bool:
        return self.name.startswith("PROVIDER_")

    @property
    def about_batch(self) -> bool:
        return self.name.startswith("BATCH_")


@dataclass(frozen=True, slots=True)
class Event:
    kind: EventKind
    item: str  # "" for provider and batch events
    message: str = ""
    provider: str = ""
