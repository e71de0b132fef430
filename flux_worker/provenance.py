"""Marking each image where readers look: XMP in the file, C2PA Content Credentials, an invisible watermark.

What is marked and why: schemas/provenance.py and docs/provenance.md. The writer (flux_worker/image_writer.py) runs
`ImageMarks.pixels` before encoding, gives the encoder `ImageMarks.xmp`, and signs the encoded bytes with
`ImageMarks.sign`. XMP and the watermark are deterministic, so the same row keeps giving the same bytes; a C2PA
manifest holds a fresh instance id and a signature each time, so signed bytes differ run to run while the pixels
do not (docs/guarantees.md).
"""

from __future__ import annotations

import io
import logging
import re
import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from xml.sax.saxutils import quoteattr

from PIL import Image

from schemas import OutputFormat
from schemas.provenance import TRAINED_ALGORITHMIC_MEDIA, WATERMARK_BITS_FOUND, ProvenanceSpec

log = logging.getLogger("flux_worker.renderer")

IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
XMP_BASIC = "http://ns.adobe.com/xap/1.0/"
MIME_TYPES = {OutputFormat.png: "image/png", OutputFormat.jpeg: "image/jpeg", OutputFormat.webp: "image/webp"}
# Characters XML 1.0 cannot hold (a prompt may have them): dropped from the XMP copy of the prompt only.
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def software() -> dict[str, str]:
    """fluxbatch as the software agent: its name and installed version."""
    try:
        installed = version("fluxbatch")
    except PackageNotFoundError:  # a checkout that was never installed
        installed = "unknown"
    return {"name": "fluxbatch", "version": installed}


def xmp_packet(identity: dict[str, Any], prompt: str | None) -> bytes:
    """The XMP every marked image carries: IPTC DigitalSourceType trainedAlgorithmicMedia, fluxbatch as the creator
    tool, the model (IPTC's AISystemUsed, AISystemVersionUsed) and, if given, the prompt (AIPromptInformation).
    The same values give the same bytes: no dates, no instance ids."""
    agent = software()
    fields = {
        "Iptc4xmpExt:DigitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        "xmp:CreatorTool": f"{agent['name']} {agent['version']}",
        "Iptc4xmpExt:AISystemUsed": identity["model_id"],
        "Iptc4xmpExt:AISystemVersionUsed": identity.get("model_revision") or "",
    }
    if prompt is not None:
        fields["Iptc4xmpExt:AIPromptInformation"] = NOT_XML.sub("", prompt)
    attributes = "".join(f"\n    {name}={quoteattr(str(value))}" for name, value in fields.items() if value)
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
        f'  <rdf:Description rdf:about="" xmlns:Iptc4xmpExt="{IPTC_EXT}" xmlns:xmp="{XMP_BASIC}"{attributes}/>\n'
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    ).encode()


def c2pa_manifest(identity: dict[str, Any], title: str) -> dict[str, Any]:
    """The C2PA manifest of one image: created (c2pa.created) as trainedAlgorithmicMedia by fluxbatch, with the
    model as an ingredient that was input to it."""
    revision = identity.get("model_revision")
    return {
        "claim_generator_info": [software()],
        "title": title,
        "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [{
            "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": software()}]}}],
        "ingredients": [{
            "title": identity["model_id"], "format": "application/octet-stream", "relationship": "inputTo",
            "instance_id": f"{identity['model_id']}@{revision}" if revision else identity["model_id"],
        }],
    }


class Signer:
    """Signs encoded images with C2PA Content Credentials, one native signer per writing thread."""

    def __init__(self, signing: dict[str, str]):
        self._signing = signing  # certificate, key, algorithm: never logged (RenderOptions keeps it out of repr)
        self._local = threading.local()

    def __repr__(self) -> str:
        return "Signer(<C2PA credentials>)"

    def sign(self, data: bytes, fmt: OutputFormat, manifest: dict[str, Any]) -> bytes:
        """`data` with a signed manifest embedded (PNG caBX chunk, JPEG APP11, WebP C2PA chunk)."""
        import c2pa

        native, context = self._native()
        signed = io.BytesIO()
        c2pa.Builder(manifest, context=context).sign(native, MIME_TYPES[fmt], io.BytesIO(data), signed)
        return signed.getvalue()

    def _native(self) -> tuple[Any, Any]:
        if not hasattr(self._local, "signer"):
            self._local.signer, self._local.context = native_signer(self._signing)
        return self._local.signer, self._local.context


def native_signer(signing: dict[str, str]) -> tuple[Any, Any]:
    """A c2pa-python signer of these credentials, and a context that embeds no thumbnail (a thumbnail would add a
    second, lossy copy of every image to it)."""
    import c2pa

    info = c2pa.C2paSignerInfo(signing["algorithm"].encode(), signing["certificate"].encode(),
                               signing["key"].encode(), None)
    context = c2pa.Context(settings=c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    return c2pa.Signer.from_info(info), context


class ImageMarks:
    """The marks of one job, applied to each image its writer encodes."""

    def __init__(self, spec: ProvenanceSpec, identity: dict[str, Any], signing: dict[str, str] | None):
        self.spec, self.identity = spec, identity
        self.signer = Signer(signing) if spec.enabled and spec.signs and signing else None
        if spec.enabled and spec.signs and self.signer is None:
            raise ValueError("provenance names a C2PA certificate, but no credentials reached this renderer")

    def pixels(self, image: Image.Image) -> Image.Image:
        """The image with the job's invisible watermark, if it asks for one."""
        if not self.spec.enabled or self.spec.watermark is None:
            return image
        from flux_worker.watermark import embed

        return embed(image, self.spec.watermark)

    def recorded(self, encoded: bytes, key: str) -> str:
        """The ledger's `provenance` value for an image encoded as `encoded`: the job's marks, less the watermark
        when it does not read back from these very bytes (a flat background, a small picture, a low JPEG quality
        can fail to hold it), so the ledger never claims a watermark the file does not carry."""
        if not self.spec.enabled or self.spec.watermark is None:
            return self.spec.marks()
        from flux_worker.watermark import bit_accuracy

        found = bit_accuracy(Image.open(io.BytesIO(encoded)), self.spec.watermark)
        if found >= WATERMARK_BITS_FOUND:
            return self.spec.marks()
        log.warning("image %s could not hold the watermark (%.0f%% of its bits read back): recorded without it",
                    key, found * 100)
        return self.spec.marks(watermark_held=False)

    def xmp(self, row: dict[str, Any]) -> bytes | None:
        """The XMP packet for `row`'s image; None when the job marks nothing."""
        if not self.spec.enabled:
            return None
        return xmp_packet(self.identity, row["prompt"] if self.spec.include_prompt else None)

    def sign(self, data: bytes, fmt: OutputFormat, title: str) -> bytes:
        """`data` signed with the job's C2PA credentials, or as it is when the job names none."""
        if self.signer is None:
            return data
        return self.signer.sign(data, fmt, c2pa_manifest(self.identity, title))


def embedded_xmp(image: Image.Image) -> bytes | None:
    """The XMP packet Pillow found in an opened image (PNG iTXt, JPEG APP1, WebP XMP chunk), if any."""
    from flux_worker.encode import PNG_XMP_KEYWORD

    found = image.info.get("xmp", image.info.get(PNG_XMP_KEYWORD))
    return found.encode() if isinstance(found, str) else found


def xmp_fields(xmp: bytes) -> dict[str, str]:
    """The IPTC and XMP-basic properties of an XMP packet by name ("Iptc4xmpExt:DigitalSourceType"), written as
    attributes (as fluxbatch writes them) or as elements (as exiftool rewrites them); {} if it does not parse."""
    from xml.etree import ElementTree

    prefixes = {IPTC_EXT: "Iptc4xmpExt", XMP_BASIC: "xmp"}
    try:
        root = ElementTree.fromstring(xmp.strip(b"\x00"))
    except ElementTree.ParseError:
        return {}
    fields: dict[str, str] = {}
    for element in root.iter():
        named = [(element.tag, element.text or "")] + list(element.attrib.items())
        for tag, value in named:
            namespace, _, name = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
            if namespace in prefixes:
                fields[f"{prefixes[namespace]}:{name}"] = value.strip()
    return fields
