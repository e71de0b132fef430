"""`fluxbatch verify --provenance`: read each committed image's marks back and name every image that lacks one.

Per ledger row (the last row of each key), the image is read and checked against what the row's `provenance`
column records (schemas/provenance.py):
- a row recording no mark (rendered with --no-provenance, or by a fluxbatch that did not mark images) is named;
- xmp: the file's XMP holds IPTC DigitalSourceType trainedAlgorithmicMedia;
- c2pa: c2pa-python finds a manifest, validates it (a changed byte anywhere it covers makes it Invalid), and its
  c2pa.created action says trainedAlgorithmicMedia;
- watermark: the job's text (from `_job.json`) is read back from the pixels with at least WATERMARK_BITS_FOUND of
  its bits right (a JPEG re-encode at quality 80 keeps about 0.8: benchmarks/README.md, "Provenance").
A missing image is plain verify's finding (pipeline/store/verify.py), not repeated here. Nothing is changed.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
from PIL import Image

from flux_worker.provenance import MIME_TYPES, embedded_xmp, xmp_fields
from flux_worker.storage import Storage
from pipeline.store import ledger
from pipeline.store.committed_images import full_paths, image_names
from schemas import OutputFormat
from schemas.provenance import C2PA, TRAINED_ALGORITHMIC_MEDIA, WATERMARK, XMP, marks_of

COLUMNS = ["key", "image_uri", "output_format", "provenance"]
READ_THREADS = 16  # images are read in parallel: on object storage each read is a round trip
CHUNK = 10_000  # rows checked per round
# Random bits agree half the time: 0.8 of 16 or more bits by chance is under 1%, of 64 bits about one in 10^6.
WATERMARK_BITS_FOUND = 0.8


def check_folder_provenance(fs: Storage, folder: str, watermark: str | None) -> dict[str, tuple[str, str]]:
    """Each image of `folder` that lacks a mark its row records, or whose row records none: key -> (path, why)."""
    table = ledger.read_metadata(fs, folder, None, each=_marks_columns)
    if table is None:
        return {}
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
    return lacking


def _marks_columns(table: pa.Table) -> pa.Table:
    """The columns this check reads; `provenance` null where a part was written before fluxbatch recorded it."""
    if "provenance" not in table.column_names:
        table = table.append_column("provenance", pa.nulls(table.num_rows, pa.string()))
    return table.select(COLUMNS).cast(pa.schema([(name, pa.string()) for name in COLUMNS]))


def _lacks(fs: Storage, path: str, row: dict[str, Any], watermark: str | None) -> str | None:
    """Why the image at `path` lacks what `row` records, or None when it carries all of it."""
    marks = marks_of(row["provenance"])
    if not marks:
        return ("no provenance marks: rendered with --no-provenance" if row["provenance"] == ""
                else "no provenance marks recorded: rendered before fluxbatch marked images")
    try:
        data = fs.read_bytes(path)
    except FileNotFoundError:
        return None  # plain verify names it missing
    problems = []
    image = Image.open(io.BytesIO(data))
    if XMP in marks:
        found = xmp_fields(embedded_xmp(image) or b"").get("Iptc4xmpExt:DigitalSourceType")
        if found != TRAINED_ALGORITHMIC_MEDIA:
            problems.append("no XMP DigitalSourceType trainedAlgorithmicMedia" if found is None
                            else f"XMP DigitalSourceType is {found!r}")
    if C2PA in marks:
        problems += c2pa_problems(data, OutputFormat(row["output_format"]))
    if WATERMARK in marks and watermark is not None:
        from flux_worker.watermark import bit_accuracy

        found_bits = bit_accuracy(image, watermark)
        if found_bits < WATERMARK_BITS_FOUND:
            problems.append(f"no watermark {watermark!r} ({found_bits:.0%} of its bits read back)")
    return "; ".join(problems) or None


def c2pa_problems(data: bytes, fmt: OutputFormat) -> list[str]:
    """What is wrong with an image's C2PA Content Credentials: none, invalid, or not saying AI-generated."""
    import c2pa

    try:
        reader = c2pa.Reader.try_create(MIME_TYPES[fmt], io.BytesIO(data))
    except c2pa.C2paError as error:
        return [f"C2PA manifest unreadable ({str(error).splitlines()[0] if str(error) else type(error).__name__})"]
    if reader is None:
        return ["no C2PA manifest"]
    with reader:
        state = reader.get_validation_state()
        manifest = reader.get_active_manifest() or {}
        results = reader.get_validation_results() or {}
    if state == "Invalid":
        failures = (results.get("activeManifest") or {}).get("failure") or [{}]
        return [f"C2PA manifest invalid ({failures[0].get('code', 'no code')}: the image changed after signing)"]
    actions = [action for assertion in manifest.get("assertions", []) if assertion.get("label", "").startswith(
        "c2pa.actions") for action in assertion.get("data", {}).get("actions", [])]
    if not any(a.get("action") == "c2pa.created" and a.get("digitalSourceType") == TRAINED_ALGORITHMIC_MEDIA
               for a in actions):
        return ["C2PA manifest has no c2pa.created action with digitalSourceType trainedAlgorithmicMedia"]
    return []



def image_marks(data: bytes, watermark: str | None) -> tuple[list[str], bool]:
    """What one image file says about itself (`fluxbatch provenance IMAGE`): a line per mark looked for, and
    whether any of them marks it as AI-generated. For an image found anywhere, not only in an OUTPUT."""
    image = Image.open(io.BytesIO(data))
    lines, marked = [], False
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
        problems = c2pa_problems(data, fmt)
        marked |= not problems
        lines.append(f"c2pa: {problems[0]}" if problems else "c2pa: valid manifest, created as trainedAlgorithmicMedia")
    if watermark is not None:
        from flux_worker.watermark import bit_accuracy

        found_bits = bit_accuracy(image, watermark)
        marked |= found_bits >= WATERMARK_BITS_FOUND
        verdict = "found" if found_bits >= WATERMARK_BITS_FOUND else "not found"
        lines.append(f"watermark {watermark!r}: {verdict} ({found_bits:.0%} of its bits read back)")
    return lines, marked
