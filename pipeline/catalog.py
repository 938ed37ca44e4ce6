"""The image models the pipeline knows, as data: `catalog.json` shipped in the package, and a
manifest's `models:` over it (same fields), so a model released tomorrow is usable today.

An entry says which aspect ratios and image sizes a model takes, the exact pixels per ratio and size
where they are published, its prices (per image and size, in batch and flex, per token), the
protocols that serve it, its aliases, and its announced shutdown and replacement, each with its
source and the day it was checked. `alias_of` makes an entry of another model's fields with a
lifecycle of its own (a preview id shut down after its GA release).

The size check: the exact pixels where the entry has them; otherwise the delivered ratio within 3%
of the asked one and the area in the asked size's band (half to twice its nominal area).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date
from functools import cache
from importlib import resources
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RATIO = r"^[1-9]\d{0,2}:[1-9]\d{0,2}$"  # W:H
PIXELS = r"^[1-9]\d{1,4}x[1-9]\d{1,4}$"  # WxH
RATIO_TOLERANCE = 0.03
NOMINAL = {"512": 512, "1K": 1024, "2K": 2048, "4K": 4096}  # an image size's side, for its area band
Ratio = Annotated[str, Field(pattern=RATIO)]
Pixels = Annotated[str, Field(pattern=PIXELS)]
Price = Annotated[float, Field(ge=0)] | dict[str, Annotated[float, Field(ge=0)]]
Tier = Literal["standard", "batch", "flex"]


class AnyRatio(BaseModel):
    """A model that takes any size within bounds (gpt-image-2): sides a multiple of `multiple_of`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    multiple_of: Annotated[int, Field(ge=1)] = 16
    min_ratio: Annotated[float, Field(gt=0)] = 1 / 3
    max_ratio: Annotated[float, Field(gt=0)] = 3.0
    max_pixels: Annotated[int, Field(gt=0)] = 3840 * 2160


class ModelEntry(BaseModel):
    """One model, as the catalog and a manifest's `models:` write it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alias_of: str | None = None  # another entry's fields, this entry's lifecycle
    aspect_ratios: list[Ratio] | None = None
    image_sizes: list[Annotated[str, Field(pattern=r"^[0-9]+K?$")]] | None = None  # None: takes none
    default_size: str | None = None  # what it makes when no image_size is sent
    sizes: dict[str, dict[Ratio, Pixels]] = {}  # exact pixels per image size ("" when it takes none)
    any_ratio: AnyRatio | None = None
    price_per_image: Price | None = None  # USD, one number or one per image size
    batch_price_per_image: Price | None = None
    flex_price_per_image: Price | None = None
    token_prices: dict[Literal["input_text", "input_image", "output_image", "output_text"], float] = {}
    protocols: list[Literal["openai-chat", "gemini", "openai-images"]] = []
    aliases: list[str] = []
    shutdown: date | None = None  # announced (earliest) shutdown
    replacement: str | None = None
    source: str | None = None
    as_of: date | None = None


@dataclass(frozen=True)
class Model:
    """A model's entry resolved (aliases followed), with the rules that use it."""

    name: str
    entry: ModelEntry

    @property
    def aspect_ratios(self) -> list[str]:
        return self.entry.aspect_ratios or []

    @property
    def image_sizes(self) -> list[str]:
        return self.entry.image_sizes or []

    def takes_ratio(self, ratio: str) -> bool:
        if ratio in self.aspect_ratios:
            return True
        bounds, parsed = self.entry.any_ratio, parse_ratio(ratio)
        return bounds is not None and parsed is not None and bounds.min_ratio <= parsed <= bounds.max_ratio

    def expected(self, ratio: str | None, image_size: str | None) -> tuple[int, int] | None:
        """The exact pixels an item should come in, where published."""
        if ratio is None:
            return None
        table = self.entry.sizes.get(image_size or self.entry.default_size or "", {})
        return parse_pixels(table[ratio]) if ratio in table else None

    def pixels(self, ratio: str, image_size: str | None) -> tuple[int, int]:
        """The size to ask for or to make: the published one, else the ratio at the size's area, its
        sides a multiple of 16 (or of the model's step)."""
        exact = self.expected(ratio, image_size)
        if exact:
            return exact
        step = self.entry.any_ratio.multiple_of if self.entry.any_ratio else 16
        side = NOMINAL.get(image_size or self.entry.default_size or "1K", 1024)
        value = parse_ratio(ratio) or 1.0
        # The shorter side rounded to the step first, the longer from it: the ratio stays close.
        short = max(step, round(side / max(value, 1 / value) ** 0.5 / step) * step)
        long = max(step, round(short * max(value, 1 / value) / step) * step)
        return (long, short) if value >= 1 else (short, long)

    def size_matches(self, ratio: str | None, image_size: str | None, width: int, height: int) -> bool | None:
        """Whether a delivered image is the size asked; None when there is nothing to check."""
        if ratio is None:
            return None
        exact = self.expected(ratio, image_size)
        if exact:
            return exact == (width, height)
        asked = parse_ratio(ratio)
        if asked is None:
            return None
        if abs(width / height - asked) > RATIO_TOLERANCE * asked:
            return False
        side = NOMINAL.get(image_size or self.entry.default_size or "")
        return side is None or side * side / 2 <= width * height <= side * side * 2

    def price(self, image_size: str | None, tier: Tier = "standard") -> float | None:
        """USD per image at this size and tier, where the catalog knows it (batch and flex default
        to half the standard price)."""
        price = {
            "standard": self.entry.price_per_image,
            "batch": self.entry.batch_price_per_image,
            "flex": self.entry.flex_price_per_image,
        }[tier]
        if price is None and tier != "standard":
            standard = self.price(image_size)
            return None if standard is None else standard / 2
        if isinstance(price, dict):
            size = image_size or self.entry.default_size or ""
            return price.get(size, price.get("", None))
        return price

    def token_cost(self, usage: dict[str, int], tier: Tier = "standard") -> float | None:
        """USD for a reply's token usage, where the catalog has token prices (batch and flex: half)."""
        prices = self.entry.token_prices
        if not set(prices) & {kind for kind, count in usage.items() if count}:
            return None
        factor = 1.0 if tier == "standard" else 0.5
        return factor * sum(price * usage.get(kind, 0) for kind, price in prices.items()) / 1_000_000


class Catalog:
    def __init__(self, entries: dict[str, ModelEntry]) -> None:
        self.entries = entries
        self._names = {alias: name for name, entry in entries.items() for alias in entry.aliases}

    def extended(self, extra: dict[str, ModelEntry] | None) -> Catalog:
        """This catalog with a manifest's entries added or put in place of ours."""
        return Catalog({**self.entries, **extra}) if extra else self

    def find(self, name: str) -> Model | None:
        """The model by its name, an alias, or its name with a version suffix (`-001`, `@2026-05`)."""
        for candidate in (name, *([bare] if (bare := strip_version(name)) != name else [])):
            key = candidate if candidate in self.entries else self._names.get(candidate)
            if key is not None:
                return Model(key, self._resolved(key))
        return None

    def _resolved(self, key: str, depth: int = 0) -> ModelEntry:
        entry = self.entries[key]
        target = entry.alias_of
        if target is None or target not in self.entries or depth > 5:
            return entry
        own = entry.model_dump(exclude_unset=True, exclude={"alias_of", "aliases"})
        return self._resolved(target, depth + 1).model_copy(update=own)

    def same_model(self, asked: str, served: str) -> bool:
        """Whether a reply's model is the one asked for (version suffixes and aliases aside)."""
        if strip_version(asked) == strip_version(served):
            return True
        mine, theirs = self.find(asked), self.find(served)
        return mine is not None and theirs is not None and mine.name == theirs.name


def strip_version(name: str) -> str:
    """`models/gemini-3-pro-image-001` -> `gemini-3-pro-image`: the path and a version suffix off."""
    name = name.rsplit("/", 1)[-1]
    return re.sub(r"(-\d{3}|@[\w.-]+|-\d{4}-\d{2}(-\d{2})?)$", "", name)


def parse_ratio(text: str) -> float | None:
    match = re.fullmatch(r"([1-9]\d{0,2}):([1-9]\d{0,2})", text)
    return int(match.group(1)) / int(match.group(2)) if match else None


def parse_pixels(text: str) -> tuple[int, int]:
    width, height = text.split("x")
    return int(width), int(height)


@cache
def shipped() -> Catalog:
    """The catalog in the package (`catalog.json`)."""
    data: dict[str, Any] = json.loads(resources.files("pipeline").joinpath("catalog.json").read_text())
    return Catalog({name: ModelEntry.model_validate(entry) for name, entry in data["models"].items()})
