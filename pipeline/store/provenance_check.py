"""`fluxbatch verify --provenance`: read each committed image's marks back and name every image that lacks one.

Per ledger row (the last row of each key), the image is read and checked against what the row's `provenance`
column records (schemas/provenance.py):
- a row recording no mark (rendered with --no-provenance, or by a fluxbatch that did not mark images) is named;
- xmp: the file's XMP holds IPTC DigitalSourceType trainedAlgorithmicMedia;
- c2pa: c2pa-python finds a manifest, validates it (a changed byte anywhere it covers makes it Invalid), and its
  c2pa.created action says trainedAlgorithmicMedia; a signer whose certificate has expired since, or that no
  trust list holds, is not a finding: the image is as it was signed;
- watermark: the job's text (from `_job.json`) is read back from the pixels with at least WATERMARK_BITS_FOUND of
  its bits right; an image whose row records no watermark although the job asked for one (the writer found its
  picture could not hold it) is named too.
A missing, unreadable or altered image or part is plain verify's finding (pipeline/store/verify.py); an unreadable
part is left out here. Nothing is changed.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from flux_worker.provenance import MIME_TYPES, embedded_xmp, xmp_fields
from flux_worker.storage import Storage
from pipeline.store import ledger
from pipeline.store.committed_images import full_paths, image_names
from schemas import OutputFormat
from schemas.errors import first_line
from schemas.provenance import (
    C2PA,
    TRAINED_ALGORITHMIC_MEDIA,
    WATERMARK,
    WATERMARK_BITS_FOUND,
    WATERMARK_MIN_PIXELS,
    XMP,
    marks_of,
    needs_package,
)

COLUMNS = ["key", "image_uri", "output_format", "provenance"]
READ_THREADS = 16  # images are read in parallel: on object storage each read is a round trip
CHUNK = 10_000  # rows checked per round
# Validation codes about the signer, not the bytes: an expired certificate, or a CA no trust list holds. The image
# is as it was signed; these are reported apart from a manifest that no longer matches its image.
SIGNER_CODES = ("signingCredential.", "timeStamp.")


def check_folder_provenance(fs: Storage, folder: str, watermark: str | None,
                            unreadable: set[str] | frozenset[str] = frozenset()
                            ) -> tuple[dict[str, tuple[str, str]], int]:
    """Each image of `folder` that lacks a mark its row records, or the job's watermark, or whose row records no
    mark (key -> (path, why)), and how many images were checked. Parts in `unreadable` (plain verify names them)
    are left out."""
    def read_all() -> pa.Table | None:
        parts = [part for part in ledger.metadata_parts(fs, folder) if part not in unreadable]
        with ThreadPoolExecutor(ledger.READ_THREADS) as pool:
            tables = list(pool.map(lambda part: _marks_columns(ledger.read_part(fs, folder, part)), parts))
        return pa.concat_tables(tables) if tables else None

    table = ledger.again_if_parts_vanish(fs, folder, read_all)
    if table is None:
        return {}, 0
    last = ledger.last_row_indices(table.column("key"))
    if last is not None:
        table = table.take(last)
    lacking: dict[str, tuple[str, str]] = {}
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, table.num_rows, CHUNK):
            chunk = table.slice(start, CHUNK)
            paths = full_paths(folder, image_names(chunk))
            rows = chunk.select(["key", "output_format", "provenance"]).to_pylist()
            for row, path, why in zip(rows, paths, pool.map(
                    lambda row, path: _lacks(fs, path, row, watermark), rows, paths)):
                if why:
                    lacking[row["key"]] = (path, why)
    return lacking, table.num_rows


def _marks_columns(table: pa.Table) -> pa.Table:
    """The columns this check reads; `provenance` null where a part was written before fluxbatch recorded it."""
    if "provenance" not in table.column_names:
        table = table.append_column("provenance", pa.nulls(table.num_rows, pa.string()))
    return table.select(COLUMNS).cast(pa.schema([(name, pa.string()) for name in COLUMNS]))


def _lacks(fs: Storage, path: str, row: dict[str, Any], watermark: str | None) -> str | None:
    """Why the image at `path` lacks what `row` records (or the job's watermark), or None when it carries all."""
    marks = marks_of(row["provenance"])
    if marks is None:
        return "no provenance marks recorded: rendered before fluxbatch marked images"
    if not marks:
        return "no provenance marks: rendered with --no-provenance"
    try:
        data = fs.read_bytes(path)
    except FileNotFoundError:
        return None  # plain verify names it missing
    try:  # the header only: XMP is there, C2PA reads the bytes, only the watermark needs the pixels
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as error:  # plain verify names it altered too (its sha256)
        return f"its marks cannot be read: not an image ({first_line(error)})"
    problems = []
    if XMP in marks:
        found = xmp_fields(embedded_xmp(image) or b"").get("Iptc4xmpExt:DigitalSourceType")
        if found != TRAINED_ALGORITHMIC_MEDIA:
            problems.append("no XMP DigitalSourceType trainedAlgorithmicMedia" if found is None
                            else f"XMP DigitalSourceType is {found!r}")
    if C2PA in marks:
        problems += [problem for problem, tampered in c2pa_findings(data, OutputFormat(row["output_format"]))
                     if tampered is not False]
    if watermark is not None:
        if WATERMARK not in marks:
            problems.append(f"no watermark {watermark!r}: the picture could not hold it when it was written (flat "
                            "colour, fine texture or a small image; docs/provenance.md)")
        else:
            try:
                found_bits = _bit_accuracy(image, watermark)
            except OSError as error:  # truncated or damaged pixel data
                problems.append(f"no watermark {watermark!r} read: its pixels cannot be decoded ({first_line(error)})")
            else:
                if found_bits < WATERMARK_BITS_FOUND:
                    problems.append(f"no watermark {watermark!r} ({found_bits:.0%} of its bits read back)")
    return "; ".join(problems) or None


def _bit_accuracy(image: Image.Image, watermark: str) -> float:
    """The watermark's bits read back (flux_worker/watermark.py), once its package is known to import."""
    needs_package("imwatermark", "reading a watermark")
    from flux_worker.watermark import bit_accuracy

    return bit_accuracy(image, watermark)


def c2pa_findings(data: bytes, fmt: OutputFormat) -> list[tuple[str, bool | None]]:
    """What is wrong with an image's C2PA Content Credentials, each with whether it means the image or its
    manifest changed (True), the signer is expired or untrusted while the image is as signed (False), or the
    manifest is missing or says other than AI-generated (None). [] for a valid manifest saying so."""
    needs_package("c2pa", "reading C2PA Content Credentials")
    import c2pa

    try:
        reader = c2pa.Reader.try_create(MIME_TYPES[fmt], io.BytesIO(data))
    except c2pa.C2paError as error:
        return [(f"C2PA manifest unreadable ({first_line(error)})", True)]
    if reader is None:
        return [("no C2PA manifest", None)]
    with reader:
        state = reader.get_validation_state()
        manifest = reader.get_active_manifest() or {}
        results = reader.get_validation_results() or {}
    findings: list[tuple[str, bool | None]] = []
    if state == "Invalid":
        failures = [f.get("code", "") for f in (results.get("activeManifest") or {}).get("failure") or []]
        changed = [code for code in failures if not code.startswith(SIGNER_CODES)]
        if changed or not failures:
            findings.append((f"C2PA manifest invalid ({changed[0] if changed else 'no code'}: the image or its "
                             "manifest changed after signing)", True))
        else:
            findings.append((f"C2PA signer not valid now ({', '.join(failures)}); the image is as signed", False))
    actions = [action for assertion in manifest.get("assertions", []) if assertion.get("label", "").startswith(
        "c2pa.actions") for action in assertion.get("data", {}).get("actions", [])]
    if not any(a.get("action") == "c2pa.created" and a.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA
               for a in actions):
        findings.append(("C2PA manifest has no c2pa.created action with digitalSourceType trainedAlgorithmicMedia",
                         None))
    return findings


def image_marks(data: bytes, watermark: str | None) -> tuple[list[str], bool, bool]:
    """What one image file says about itself (`fluxbatch provenance IMAGE`): a line per mark looked for, whether
    any of them marks it as AI-generated, and whether its C2PA manifest says it changed after signing. For an
    image found anywhere, not only in an OUTPUT."""
    image = Image.open(io.BytesIO(data))
    lines, marked, tampered = [], False, False
    fields = xmp_fields(embedded_xmp(image) or b"")
    source = fields.get("Iptc4xmpExt:DigitalSourceType")
    if source is None:
        lines.append("xmp: no DigitalSourceType")
    else:
        marked |= source == TRAINED_ALGORITHMIC_MEDIA
        model = fields.get("Iptc4xmpExt:AISystemUsed", "?")
        revision = fields.get("Iptc4xmpExt:AISystemVersionUsed")
        lines.append(f"xmp: {source.rsplit('/', 1)[-1]}, by {fields.get('xmp:CreatorTool', '?')}, model {model}"
                     + (f" at {revision}" if revision else ""))
    fmt = {"PNG": OutputFormat.png, "JPEG": OutputFormat.jpeg, "WEBP": OutputFormat.webp}.get(image.format or "")
    if fmt is None:
        lines.append(f"c2pa: not checked ({image.format} is not a format fluxbatch writes)")
    else:
        findings = c2pa_findings(data, fmt)
        marked |= all(changed is False for _, changed in findings)  # an expired signer still says it
        tampered = any(changed is True for _, changed in findings)
        lines += [f"c2pa: {finding}" for finding, _ in findings] or [
            "c2pa: valid manifest, created as trainedAlgorithmicMedia"]
    if watermark is not None and image.width * image.height < WATERMARK_MIN_PIXELS:
        lines.append(f"watermark {watermark!r}: not looked for ({image.width}x{image.height} is too small to hold "
                     "one; a watermark needs 256x256)")
    elif watermark is not None:
        found_bits = _bit_accuracy(image, watermark)
        marked |= found_bits >= WATERMARK_BITS_FOUND
        verdict = "found" if found_bits >= WATERMARK_BITS_FOUND else "not found"
        lines.append(f"watermark {watermark!r}: {verdict} ({found_bits:.0%} of its bits read back)")
    return lines, marked, tampered
