"""What each item needs, from the manifest, the state store and the files on disk.

`decide` is the pure rule; `plan_items` applies it to every item as a stream; `preview` counts the
plan for `run --dry-run` without sending anything or writing anything.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline.catalog import Tier
from pipeline.errors import PERMANENT_KINDS
from pipeline.item import Item, Status
from pipeline.manifest import Manifest, iter_items
from pipeline.state import Row, State
from pipeline.storage import Store

TYPICAL_LATENCY_S = 15.0  # a generation takes 5-15 s as documented, 8-30 s in real traffic


class Step(Enum):
    DONE = "done"  # its image is on disk: nothing to pay for
    FAILED = "failed"  # failed for good last time; left alone unless --retry-failed
    DOWNLOAD = "download"  # generated, its URL still fresh: look on disk, else fetch; no new payment
    ADOPT = "adopt"  # generated, its URL stale or inline: look on disk before paying again
    GENERATE = "generate"


def decide(
    item: Item, row: Row | None, image_exists: bool, now: float, url_ttl_s: float, retry_failed: bool
) -> Step:
    if row is None or row.status == Status.NEW:
        return Step.GENERATE
    if row.image_fp == item.fingerprint and image_exists:
        return Step.DONE
    if row.fp != item.fingerprint:
        return Step.GENERATE
    if row.status == Status.FAILED:
        permanent = row.error_type in PERMANENT_KINDS
        return Step.FAILED if permanent and not retry_failed else Step.GENERATE
    if row.status == Status.URL:
        fresh = row.url is not None and row.url_at is not None and now - row.url_at < url_ttl_s
        return Step.DOWNLOAD if fresh else Step.ADOPT
    return Step.GENERATE


def step_of(item: Item, row: Row | None, store: Store, url_ttl_s: float, retry_failed: bool) -> Step:
    """What an item needs, looking in the store only when the state says its image is current."""
    exists = (
        row is not None
        and row.file is not None
        and row.image_fp == item.fingerprint
        and store.exists(row.file)
    )
    return decide(item, row, exists, time.time(), url_ttl_s, retry_failed)


def plan_items(
    manifest: Manifest, state: State | None, store: Store, retry_failed: bool
) -> Iterator[tuple[Item, Row | None, Step]]:
    """Every item with its state row and what it needs, one at a time."""
    for item in iter_items(manifest):
        row = state.get(item) if state else None
        yield item, row, step_of(item, row, store, manifest.url_ttl_s, retry_failed)


@dataclass
class Preview:
    """The plan of a run, counted: what `run --dry-run` prints."""

    items: int = 0
    steps: Counter[str] = field(default_factory=Counter)  # new, changed, done, failed, retry, ...
    orphaned: int = 0  # recorded in the output but no longer in the manifest
    concurrency: int = 1
    cost: float = 0.0  # USD, of the paid requests at most
    unpriced: int = 0  # paid requests of a model whose price is unknown (not in `cost`)
    jobs: int | None = None  # batch jobs a batch run would create

    @property
    def paid_requests(self) -> int:
        """At most this many generations (found files and fresh URLs may save some)."""
        return sum(self.steps[s] for s in PAID)

    @property
    def duration_s(self) -> float:
        return math.ceil(self.paid_requests / self.concurrency) * TYPICAL_LATENCY_S

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            **{k: self.steps[k] for k in LABELS},
            "orphaned": self.orphaned,
            "paid_requests": self.paid_requests,
            "cost_usd": round(self.cost, 2),
            "unpriced": self.unpriced,
            "duration_s": round(self.duration_s),
            "concurrency": self.concurrency,
            **({} if self.jobs is None else {"batch_jobs": self.jobs, "in_batch": self.steps["in_batch"]}),
        }


LABELS = ("new", "changed", "done", "failed", "retry", "download", "resume")
PAID = ("new", "changed", "retry", "resume")


def preview(
    manifest: Manifest, store: Store, state: State | None, retry_failed: bool, mode: str = "online"
) -> Preview:
    """The plan of a run on `store` with its `state` (None: it never ran)."""
    result = Preview(concurrency=manifest.generation_limit)
    price = preferred_price(manifest, mode)
    model = manifest.model_entry
    first = min(
        (spec for spec in manifest.pool() if spec.mode == mode), key=lambda spec: spec.priority, default=None
    )
    tier: Tier = (
        "batch" if mode == "batch" else "flex" if first and first.service_tier == "flex" else "standard"
    )
    with state if state is not None else contextlib.nullcontext():
        matched = 0
        for item, row, step in plan_items(manifest, state, store, retry_failed):
            result.items += 1
            matched += row is not None
            label = _label(item, row, step)
            if label in PAID and mode == "batch" and state is not None and state.in_open_batch(item):
                label = "in_batch"  # already in a submitted job: collected, not paid again
            result.steps[label] += 1
            if label in PAID:
                each = price if price is not None else model.price(item.image_size, tier) if model else None
                if each is None:
                    result.unpriced += 1
                else:
                    result.cost += each
        result.orphaned = (state.count_rows() if state else 0) - matched
    if mode == "batch":
        result.jobs = math.ceil(result.paid_requests / manifest.batch.max_requests)
    return result


def preferred_price(manifest: Manifest, mode: str = "online") -> float | None:
    """USD per image where generations go first: the provider of the run's mode with the lowest
    priority (the cheapest among equals); its `price_per_image`, else the manifest's; None: the
    model's list price (halved in batch mode)."""
    fallback = manifest.price_per_image
    prices = [
        (spec.priority, spec.price_per_image if spec.price_per_image is not None else fallback)
        for spec in manifest.pool()
        if spec.mode == mode
    ] or [(0, fallback)]
    return min(prices, key=lambda pair: (pair[0], pair[1] is None, pair[1] or 0.0))[1]


def _label(item: Item, row: Row | None, step: Step) -> str:
    if step is Step.GENERATE:
        if row is None or (row.status == Status.NEW and row.fp == item.fingerprint):
            return "new"
        return "changed" if row.fp != item.fingerprint else "retry"
    labels = {Step.DOWNLOAD: "download", Step.ADOPT: "resume"}
    return labels.get(step, str(step.value))
