"""What an image file is: its format, its size, whether it decodes whole, and its digest. Pure reads
of bytes or a file, used by the write path and by the manifest's check of reference images."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from PIL import Image

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
MAX_PIXELS = 40_000_000


class TooManyPixels(ValueError):
    """An image whose header announces absurd dimensions (a decompression bomb)."""


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file's bytes."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
        return digest.hexdigest(), handle.tell()


def inspect_image(path: Path | io.BytesIO) -> tuple[str, int, int]:
    """(extension, width, height) of an image file after decoding it whole; ValueError if unusable.

    The dimensions are checked from the header before any pixel is decoded (decompression bombs).
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise TooManyPixels(f"{width}x{height} pixels is over the {MAX_PIXELS} pixel limit")
            if image.format not in EXTENSIONS:
                raise ValueError(f"unsupported format {image.format}")
            image.load()
            return EXTENSIONS[image.format], width, height
    except Image.DecompressionBombError as exc:
        raise TooManyPixels(str(exc)) from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
