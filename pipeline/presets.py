"""The known image models (aspect ratios, the pixel size of each, list prices) and the rule for item ids.

Sources: Google's Gemini API image-generation documentation ("Aspect ratios and image size", the
tables per model) and its pricing page (USD per output image), as of 2026-11; the provider
contracts in `shared/` agree for gemini-2.5-flash-image. A model missing here may still be used: it
gets the seed table's ratios, no size check, and the seed's price unless `price_per_image` is set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# gemini-2.5-flash-image: the ten presets and the size each produces (provider contract, section 1).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (832, 1248),
    "3:2": (1248, 832),
    "3:4": (864, 1184),
    "4:3": (1184, 864),
    "4:5": (896, 1152),
    "5:4": (1152, 896),
    "9:16": (768, 1344),
    "16:9": (1344, 768),
    "21:9": (1536, 672),
}
# gemini-3-pro-image-preview at image_size 1K; 2K and 4K are exactly two and four times as large.
_PRO_1K: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "2:3": (848, 1264),
    "3:2": (1264, 848),
    "3:4": (896, 1200),
    "4:3": (1200, 896),
    "4:5": (928, 1152),
    "5:4": (1152, 928),
    "9:16": (768, 1376),
    "16:9": (1376, 768),
    "21:9": (1584, 672),
}
IMAGE_SIZES = ("1K", "2K", "4K")


@dataclass(frozen=True)
class ModelSpec:
    """What a model makes: the size per `image_size` (None when it takes none) and aspect ratio, and
    the list price per image for each `image_size`."""

    sizes: dict[str | None, dict[str, tuple[int, int]]]
    prices: dict[str | None, float]
    default_size: str | None = None  # what the model makes when no image_size is sent

    @property
    def image_sizes(self) -> tuple[str, ...]:
        return tuple(size for size in self.sizes if size is not None)

    def size(self, aspect_ratio: str, image_size: str | None) -> tuple[int, int] | None:
        return self.sizes.get(image_size or self.default_size, {}).get(aspect_ratio)

    def price(self, image_size: str | None) -> float:
        return self.prices[image_size or self.default_size]


_FLASH = ModelSpec(sizes={None: ASPECT_RATIOS}, prices={None: 0.039})
MODELS: dict[str, ModelSpec] = {
    "gemini-2.5-flash-image": _FLASH,
    "gemini-2.5-flash-image-preview": _FLASH,
    "gemini-3-pro-image-preview": ModelSpec(
        sizes={
            size: {ratio: (w * k, h * k) for ratio, (w, h) in _PRO_1K.items()}
            for size, k in (("1K", 1), ("2K", 2), ("4K", 4))
        },
        prices={"1K": 0.134, "2K": 0.134, "4K": 0.24},
        default_size="1K",
    ),
}
SEED = MODELS["gemini-2.5-flash-image"]


def expected_size(model: str, aspect_ratio: str | None, image_size: str | None) -> tuple[int, int] | None:
    """The pixel size an item should come back in, or None when there is nothing to check (an edit that
    keeps its input's size, or a model not in the table)."""
    spec = MODELS.get(model)
    return spec.size(aspect_ratio, image_size) if spec and aspect_ratio else None


def list_price(model: str, image_size: str | None) -> float:
    spec = MODELS.get(model, SEED)
    return spec.price(image_size if image_size in spec.sizes else None)


ID_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
ID_RE = re.compile(ID_PATTERN)
ID_RULE = "must be 1-100 characters of A-Z a-z 0-9 . _ -"
