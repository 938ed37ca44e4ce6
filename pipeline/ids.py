"""The rule for item ids: what a job id (and so an image's file name) may be."""

from __future__ import annotations

import re

ID_PATTERN = r"^[A-Za-z0-9._-]{1,100}$"
ID_RE = re.compile(ID_PATTERN)
ID_RULE = "must be 1-100 characters of A-Z a-z 0-9 . _ -"
