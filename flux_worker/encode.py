"""Encode a rendered image to PNG, JPEG or WebP bytes, deterministically for the same pixels."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

from schemas import OutputFormat

# Where PNG readers (exiftool, Adobe's, Pillow) look for XMP: an iTXt chunk of this keyword, uncompressed.
PNG_XMP_KEYWORD = "XML:com.adobe.xmp"


def encode_image(image: Image.Image, fmt: OutputFormat, *, jpeg_quality: int, webp_quality: int,
                 xmp: bytes | None = None) -> bytes:
    """The file bytes of `image` in `fmt`, with `xmp` embedded where the format keeps XMP (PNG iTXt, JPEG APP1,
    WebP XMP chunk); no timestamps or other varying metadata are embedded."""
    buffer = io.BytesIO()
    if fmt is OutputFormat.png:
        info = None
        if xmp is not None:
            info = PngImagePlugin.PngInfo()
            info.add_itxt(PNG_XMP_KEYWORD, xmp.decode(), zip=False)
        image.save(buffer, format="PNG", optimize=False, compress_level=6, pnginfo=info)
    elif fmt is OutputFormat.jpeg:
        image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality, **({"xmp": xmp} if xmp else {}))
    else:
        image.save(buffer, format="WEBP", quality=webp_quality, method=4, **({"xmp": xmp} if xmp else {}))
    return buffer.getvalue()
