"""Encode a rendered image to PNG, JPEG or WebP bytes, deterministically for the same pixels."""

from __future__ import annotations

import io

from PIL import Image

from schemas import OutputFormat


def encode_image(image: Image.Image, fmt: OutputFormat, *, jpeg_quality: int, webp_quality: int) -> bytes:
    """The file bytes of `image` in `fmt`; no timestamps or other varying metadata are embedded."""
    buffer = io.BytesIO()
    if fmt is OutputFormat.png:
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    elif fmt is OutputFormat.jpeg:
        image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, format="WEBP", quality=webp_quality, method=4)
    return buffer.getvalue()
