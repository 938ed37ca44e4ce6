"""What each item needs, decided from the manifest and the state store. Pure."""

from __future__ import annotations

from enum import Enum

from pipeline.errors import PERMANENT_KINDS
from pipeline.manifest import Item
from pipeline.state import Row


class Step(Enum):
    DONE = "done"  # its image is on disk: nothing to pay for
    FAILED = "failed"  # failed for good last time; left alone unless --retry-failed
    DOWNLOAD = "download"  # generated, its URL still fresh: fetch without paying again
    ADOPT = "adopt"  # generated, maybe fetched before a crash: look on disk before paying again
    GENERATE = "generate"


def decide(
    item: Item,
    row: Row | None,
    image_exists: bool,
    now: float,
    url_ttl_s: float,
    retry_failed: bool,
) -> Step:
    if row is None:
        return Step.GENERATE
    if row.image_fp == item.fingerprint and image_exists:
        return Step.DONE
    if row.fp != item.fingerprint:
        return Step.GENERATE
    if row.status == "failed":
        permanent = row.error_type in PERMANENT_KINDS
        return Step.FAILED if permanent and not retry_failed else Step.GENERATE
    if row.status == "url":
        fresh = row.url is not None and row.url_at is not None and now - row.url_at < url_ttl_s
        return Step.DOWNLOAD if fresh else Step.ADOPT
    return Step.GENERATE
