"""One image to make, its fingerprint, and the statuses its state row goes through. Imports nothing
of ours: the manifest makes items, the state stores them, the runners work on them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Item:
    """One image to make: the `index`-th image of job `id`. The fingerprint covers everything
    that changes the image: a new fingerprint means a new image."""

    id: str
    index: int
    prompt: str
    aspect_ratio: str | None  # None: an edit that keeps its input image's size
    model: str
    fingerprint: str
    images: tuple[str, ...] = ()  # reference images: absolute file paths or http(s) URLs
    image_size: str | None = None  # 1K, 2K or 4K for models that take one; None: the model's default
    options: tuple[tuple[str, str], ...] = ()  # images API settings of its job (quality, background...)

    @property
    def name(self) -> str:
        return f"{self.id}_{self.index}"


def item_fingerprint(
    prompt: str,
    aspect_ratio: str | None,
    model: str,
    inputs: tuple[str, ...] = (),
    image_size: str | None = None,
    options: tuple[tuple[str, str], ...] = (),
) -> str:
    """`inputs`: what identifies each reference image (a file's sha256, or its URL). An image size and
    a job's image options are added only when set, so items from before them keep their fingerprints."""
    text = "\x1f".join((model, aspect_ratio or "", prompt, *inputs))
    if image_size:
        text += f"\x1fimage_size={image_size}"
    text += "".join(f"\x1f{name}={value}" for name, value in options)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class Status(StrEnum):
    """An item's row in the state (the `status` column)."""

    NEW = "new"  # entered by a worker for the others to claim (shared states only)
    URL = "url"  # generated: its `url` (None for an inline image) awaits download
    DONE = "done"  # its image is recorded
    FAILED = "failed"  # `error_type` and `message` say why
