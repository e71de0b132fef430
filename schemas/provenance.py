"""What each image says about where it came from (`provenance:` in a job file): the marks and their names.

By default every image carries XMP (PNG iTXt, JPEG APP1, WebP XMP chunk) with the IPTC digital source type
trainedAlgorithmicMedia, the software and the model; C2PA Content Credentials are added when the job names a
signing certificate and key, an invisible watermark when it names a message. The renderer makes the marks
(flux_worker/provenance.py), the ledger records which an image carries (the `provenance` column), and
`fluxbatch verify --provenance` reads them back (pipeline/store/provenance_check.py). docs/provenance.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.errors import FluxbatchError, first_line
from schemas.urls import storage_url

# IPTC NewsCodes: "the digital creation of a model trained on samples" (EU AI Act art. 50(2) marking, platforms).
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# The marks, as the ledger's `provenance` column lists them ("xmp+c2pa+watermark"; "" for none).
XMP, C2PA, WATERMARK = "xmp", "c2pa", "watermark"
MARK_SEPARATOR = "+"
# dwtDct spreads each bit over the image's 4x4 blocks: invisible-watermark refuses fewer than 256x256 pixels, and
# more than 8 bytes would leave too few blocks a bit at 256x256 to survive a JPEG re-encode.
WATERMARK_MAX_BYTES = 8
WATERMARK_MIN_PIXELS = 256 * 256
# A watermark counts as there when this share of its bits reads back: random bits agree half the time, so 0.8 of
# 16 or more bits by chance is under 1%, of 64 bits about one in 10^6. The writer checks each image it marks.
WATERMARK_BITS_FOUND = 0.8


class ProvenanceSpec(BaseModel):
    """Marks every image carries: XMP by default, C2PA Content Credentials and an invisible watermark on request."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="mark every image as AI-generated: IPTC DigitalSourceType trainedAlgorithmicMedia in XMP, with "
        "fluxbatch and the model (off: bare images, no mark of any kind)",
    )
    include_prompt: bool = Field(
        default=False, description="also write each image's prompt into its XMP (prompts may be confidential)")
    c2pa_certificate: str | None = Field(
        default=None,
        description="C2PA Content Credentials: the signing certificate chain (PEM, leaf first), any fsspec URL; "
        "needs --c2pa-key",
    )
    c2pa_key: str | None = Field(
        default=None,
        description="the private key (PEM) of --c2pa-certificate, any fsspec URL; read by the driver, handed to "
        "renderers like storage credentials, never logged or written to OUTPUT",
    )
    watermark: str | None = Field(
        default=None,
        description=f"an invisible watermark (invisible-watermark's dwtDct) holding this text, 1-{WATERMARK_MAX_BYTES} "
        "bytes; images must be at least 256x256",
    )

    @field_validator("c2pa_certificate", "c2pa_key")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and ("-----BEGIN" in value or "\n" in value):
            # A PEM given where its URL belongs: never echoed (a key must not reach a log or an error).
            raise ValueError("takes the URL of a PEM file (a path, s3://...), not the PEM text itself")
        return None if value is None else storage_url(value)

    @field_validator("watermark")
    @classmethod
    def _watermark(cls, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value.encode()) <= WATERMARK_MAX_BYTES:
            raise ValueError(f"{value!r} is {len(value.encode())} bytes in UTF-8; a watermark holds 1 to "
                             f"{WATERMARK_MAX_BYTES}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ProvenanceSpec:
        if (self.c2pa_certificate is None) != (self.c2pa_key is None):
            given, missing = (("c2pa_certificate (--c2pa-certificate)", "c2pa_key (--c2pa-key URL)")
                              if self.c2pa_key is None else
                              ("c2pa_key (--c2pa-key)", "c2pa_certificate (--c2pa-certificate URL)"))
            raise ValueError(f"{given} needs {missing} too: C2PA signs with the certificate and its key")
        if not self.enabled and (self.c2pa_certificate or self.watermark or self.include_prompt):
            asked = [name for name, value in (("--c2pa-certificate", self.c2pa_certificate),
                                              ("--watermark", self.watermark),
                                              ("--include-prompt", self.include_prompt)) if value]
            raise ValueError(f"--no-provenance (enabled: false) turns every mark off, and {' and '.join(asked)} "
                             "asks for one: drop one or the other")
        return self

    @property
    def signs(self) -> bool:
        return self.c2pa_certificate is not None

    def marks(self, watermark_held: bool = True) -> str:
        """The marks each image of this job carries, as the ledger's `provenance` column records them; without
        `watermark` for an image whose picture could not hold it (read back below WATERMARK_BITS_FOUND)."""
        if not self.enabled:
            return ""
        watermarked = self.watermark is not None and watermark_held
        return MARK_SEPARATOR.join([XMP] + [C2PA] * self.signs + [WATERMARK] * watermarked)

    def identity(self) -> dict[str, Any]:
        """What decides the images' bytes (`_job.json`): the marks, the prompt's presence, the watermark's text.
        Not the certificate: renewing it changes no pixel and must not make every OUTPUT another job."""
        return {"marks": self.marks(), "include_prompt": self.include_prompt, "watermark": self.watermark}


MARKS = (XMP, C2PA, WATERMARK)


def marks_of(recorded: str | None) -> set[str] | None:
    """The marks a ledger row's `provenance` value names: set() for "" (a job with --no-provenance); None when
    it records none (null: a row written before fluxbatch recorded marks; anything else: a manifest's own column
    named `provenance` that an older fluxbatch kept under that name)."""
    if recorded is None:
        return None
    marks = set(recorded.split(MARK_SEPARATOR)) - {""}
    return marks if marks <= set(MARKS) else None


class ProvenancePackageError(FluxbatchError):
    """A mark asked for, or read back, needs a package of the `provenance` extra that is missing or does not
    import (OpenCV needs system libraries, libGL, that an image may lack)."""


def needs_package(module: str, what: str) -> None:
    """Import `module` (c2pa, imwatermark) for `what` ("C2PA signing"); one line naming the fix if it fails."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        raise ProvenancePackageError(f"{what} needs the {PACKAGES[module]} package: pip install "
                                     "'fluxbatch[provenance]'") from None
    except (ImportError, OSError) as error:
        raise ProvenancePackageError(f"{what}: {PACKAGES[module]} does not import here ({first_line(error)}); "
                                     "install the system libraries it needs (OpenCV: libGL)") from None


PACKAGES = {"c2pa": "c2pa-python", "imwatermark": "invisible-watermark"}  # module -> the package of the extra
