"""Reference images on a renderer: read through `Storage` (retries), checked against the driver's sha256, decoded,
resized as the pipeline expects, cached; and the one rule of what counts as an acceptable image file.

The driver (pipeline/references.py) has already refused every reference outside the job's roots, too large, or
not an image, and recorded each one's sha256; a renderer reads only those URLs, and refuses bytes that no longer
hash to what the driver saw (the photo was replaced mid-run: the image would not match its key).

No torch here: the driver imports `decode` to check references with exactly the renderer's rules.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from typing import Any

from fsspec.core import split_protocol, strip_protocol
from PIL import Image

from flux_worker.storage import Storage, filesystem

# Pillow refuses to open an image over twice MAX_IMAGE_PIXELS (DecompressionBombError, from the header alone) and
# warns over once; its default (about 89 million) is set here explicitly to our own limit, which `decode` checks
# itself from the header before decoding anything.
MAX_REFERENCE_PIXELS = 40_000_000  # e.g. 8000 x 5000: more than any product photo needs
MAX_REFERENCE_BYTES = 50 * 2**20
Image.MAX_IMAGE_PIXELS = MAX_REFERENCE_PIXELS
# Only these decoders ever see a reference's bytes: Pillow would otherwise also try formats whose plugins run
# external programs (EPS through Ghostscript) or are rarely exercised.
FORMATS = ("PNG", "JPEG", "WEBP")
CACHE_IMAGES = 16  # decoded references kept per renderer: the same photo feeds many variants in a row
FLUX2_MIN_SIDE = 64  # diffusers' Flux2ImageProcessor refuses a reference with a shorter side


class ReferenceImageError(ValueError):
    """A reference's bytes are not an acceptable image (the message says why), or changed since the driver's check."""


def decode(data: bytes) -> Image.Image:
    """The image in `data` decoded as RGB; ReferenceImageError when it is not a PNG, JPEG or WebP, its header
    claims more than MAX_REFERENCE_PIXELS (refused before any pixel is decoded), or it does not decode whole."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ReferenceImageError(f"its header claims over {2 * MAX_REFERENCE_PIXELS} pixels; at most "
                                  f"{MAX_REFERENCE_PIXELS} are allowed (refused without decoding)") from None
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        raise ReferenceImageError(f"not a {', '.join(FORMATS)} image ({type(error).__name__})") from None
    with image:
        width, height = image.size
        if width * height > MAX_REFERENCE_PIXELS:
            raise ReferenceImageError(f"{width}x{height} is {width * height} pixels; at most {MAX_REFERENCE_PIXELS} "
                                      "are allowed (refused from its header, without decoding)")
        try:
            image.load()
            return image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ReferenceImageError(f"a {image.format} image that does not decode: {error}") from None


def fit_area(image: Image.Image, width: int, height: int, multiple: int = 16) -> Image.Image:
    """`image` resized to about width x height pixels in all, its own aspect ratio kept, sides a multiple of 16.

    FLUX.1 Kontext conditions on a reference of about the output's area (its pipeline would resize to one of its
    ~1 MP training sizes; fluxbatch passes `_auto_resize=False` and resizes here, so the output keeps the row's
    size and a small output's reference is not encoded at a megapixel)."""
    aspect = image.width / image.height
    area = width * height
    new_width = max(multiple, round((area * aspect) ** 0.5) // multiple * multiple)
    new_height = max(multiple, round((area / aspect) ** 0.5) // multiple * multiple)
    if (new_width, new_height) == image.size:
        return image
    return image.resize((new_width, new_height), Image.Resampling.LANCZOS)


def at_least(image: Image.Image, side: int) -> Image.Image:
    """`image` scaled up, its aspect ratio kept, until both sides are at least `side` pixels."""
    scale = side / min(image.size)
    if scale <= 1:
        return image
    size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


class ReferenceReader:
    """Reads a row's reference images through `Storage`, keeps the last CACHE_IMAGES decoded, and makes the
    pipeline's keyword inputs from them."""

    def __init__(self, storage_options: dict[str, Any] | None, pipeline_class: str, cache_images: int = CACHE_IMAGES):
        self.options = storage_options or {}
        self.pipeline_class = pipeline_class
        self.cache_images = cache_images
        self._cache: OrderedDict[tuple[str, str], Image.Image] = OrderedDict()
        self._stores: dict[str, Storage] = {}
        self._lock = threading.Lock()

    def inputs(self, row: dict[str, Any]) -> dict[str, Any]:
        """The pipeline's keyword arguments for the references of `row` (one same-shape batch shares them)."""
        references = row.get("reference_images") or []
        if not references:
            return {}
        images = [self.image(ref["url"], ref["sha256"]) for ref in references]
        if self.pipeline_class == "FluxKontextPipeline":
            # One reference, at the output's area; max_area keeps the row's width x height (the pipeline would
            # otherwise scale the output to 1 MP).
            width, height = row["width"], row["height"]
            return {"image": fit_area(images[0], width, height), "max_area": width * height, "_auto_resize": False}
        # Flux2Pipeline and Flux2KleinPipeline take the list; each is scaled down past 1 MP and cropped to a
        # multiple of 16 by the pipeline itself, which refuses a side under 64 px: a small photo is scaled up here.
        return {"image": [at_least(image, FLUX2_MIN_SIDE) for image in images]}

    def image(self, url: str, sha256: str) -> Image.Image:
        """The decoded reference at `url`, whose bytes must hash to `sha256` (the driver's reading)."""
        key = (url, sha256)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        store, path = self._store(url)
        data = store.read_bytes(path)  # retries transient faults, as every read and write of a run
        found = hashlib.sha256(data).hexdigest()
        if found != sha256:
            raise ReferenceImageError(f"reference {url} changed since the driver checked it (sha256 {found[:12]}..., "
                                      f"expected {sha256[:12]}...); run again to render from the new one")
        image = decode(data)
        with self._lock:
            self._cache[key] = image
            while len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        return image

    def _store(self, url: str) -> tuple[Storage, str]:
        """One `Storage` per protocol for the renderer's life (an S3 client is costly to make), and the path."""
        protocol = split_protocol(url)[0] or "file"
        if protocol not in self._stores:
            self._stores[protocol] = filesystem(url, self.options)[0]
        return self._stores[protocol], strip_protocol(url)
