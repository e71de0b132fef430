"""The invisible watermark: Black Forest Labs' reference scheme (invisible-watermark's dwtDct), with the job's text.

dwtDct writes each bit of the message into the DCT of 4x4 blocks of the image's U (blue-difference) chroma plane
after a Haar wavelet, repeated over every block, so a bit survives what averages out over blocks: on smooth
pictures a JPEG re-encode at quality 80 keeps most bits; fine texture, flat white and small pictures hold it poorly
(benchmarks/README.md, "Provenance"), so the writer reads every watermark back before recording it. It does not
survive a crop that shifts the block grid, a rotation or a strong resize (docs/provenance.md). Deterministic:
the same pixels and text give the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from schemas.provenance import WATERMARK_MIN_PIXELS

METHOD = "dwtDct"


def embed(image: Image.Image, text: str) -> Image.Image:
    """`image` with `text` (UTF-8) in its watermark."""
    from imwatermark import WatermarkEncoder  # imports OpenCV: only on a job that asks for a watermark

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode())
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    marked = encoder.encode(np.ascontiguousarray(bgr), METHOD)
    return Image.fromarray(np.ascontiguousarray(marked[:, :, ::-1]))


def bit_accuracy(image: Image.Image, text: str) -> float:
    """The share of `text`'s bits read back from `image` (1.0: all; about 0.5: no watermark of it); 0.0 for an
    image too small to hold one (invisible-watermark refuses it)."""
    from imwatermark import WatermarkDecoder

    if image.width * image.height < WATERMARK_MIN_PIXELS:
        return 0.0
    expected = np.unpackbits(np.frombuffer(text.encode(), np.uint8))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    found = np.asarray(WatermarkDecoder("bits", len(expected)).decode(bgr, METHOD), dtype=np.uint8)
    return float((found == expected).mean())

