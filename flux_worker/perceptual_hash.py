"""A perceptual hash per image: 64 bits that change little when the picture changes little.

The algorithm of the `imagehash` library's `phash` (hash_size 8, highfreq_factor 4), so hashes can be compared
with other tools': the image in grayscale, resized to 32x32 with Lanczos, its 2-D DCT-II (axis 0, then axis 1, as
scipy.fftpack.dct without normalisation), the top-left 8x8 lowest frequencies, and one bit per frequency: 1 where
its coefficient is above their median. Bits are read row by row (row: vertical frequency, column: horizontal),
the first the most significant, as 16 lowercase hex digits.

One change from imagehash: a coefficient counts as above the median only by more than TIE_TOLERANCE. A flat or
symmetric picture has coefficients that are exactly equal, and in floating point they differ by rounding noise
that depends on the machine's BLAS; without the tolerance their bits would too. With it a flat picture hashes to
8000000000000000 (only the mean is above the median) and black to 0, on every machine.

Coarse on purpose: a one-pixel change, a re-encode or a slight resize keeps all or nearly all bits; the DCT of a
32x32 thumbnail sees composition, not detail. About 0.8 ms per 512x512 image and 3 ms per 1024x1024 on one core,
mostly Pillow's resize (benchmarks/README.md, "Near-duplicates").
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIDE = 8  # 8x8 frequencies: 64 bits
IMAGE_SIDE = 32  # HASH_SIDE x imagehash's highfreq_factor 4
# Coefficients reach about 4 x 255 x 32 x 32 = 1e6, so float64 rounds them by under 1e-8: 100 times less.
TIE_TOLERANCE = 1e-6


def _dct_rows() -> np.ndarray:
    """The first HASH_SIDE rows of the DCT-II matrix for IMAGE_SIDE points: 2 cos(pi k (2n + 1) / 2N)."""
    k = np.arange(HASH_SIDE)[:, None]
    n = np.arange(IMAGE_SIDE)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * n + 1) / (2 * IMAGE_SIDE))


_DCT = _dct_rows()


def phash(image: Image.Image) -> str:
    """`image`'s 64-bit DCT perceptual hash (imagehash's phash) as 16 lowercase hex digits; any Pillow mode."""
    pixels = np.asarray(image.convert("L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS), dtype=np.float64)
    low = _DCT @ pixels @ _DCT.T  # the DCT along axis 0 then axis 1, only the 8x8 lowest frequencies
    bits = (low > np.median(low) + TIE_TOLERANCE).ravel()
    return np.packbits(bits).tobytes().hex()  # row-major, the first bit the most significant


def distance(a: str, b: str) -> int:
    """The number of bits in which two hex hashes differ (Hamming distance): 0 for the same picture, 64 at most."""
    return (int(a, 16) ^ int(b, 16)).bit_count()
