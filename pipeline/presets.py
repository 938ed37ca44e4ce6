"""The provider's aspect-ratio presets and the rule for item ids, shared by every input format."""

from __future__ import annotations

import re

# The ten presets and the pixel size each produces (provider contract, section 1).
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
ID_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
ID_RE = re.compile(ID_PATTERN)
ID_RULE = "must be 1-100 characters of A-Z a-z 0-9 . _ -"
