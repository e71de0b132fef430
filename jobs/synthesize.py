"""`fluxbatch synthesize SPEC.yaml`: draw a synthetic data set's manifest from templates and slots, then render it.

Drawing is a pure function of the spec: prompt i takes its template, each slot's value and its seed from a
hash of (spec seed, i, what), never from a running random stream. So the same spec draws the same manifest,
and raising `prompts` keeps the first prompts as they were (a re-run renders only the new ones).

The manifest is written to OUTPUT/manifest.parquet, the spec to OUTPUT/synthesis.json, and the images go
through `pipeline.render` like any other job; `output.layout` picks files, WebDataset or HF Parquet.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flux_worker.storage import filesystem
from schemas import RunSummary
from schemas.errors import FluxbatchError, first_line
from schemas.job_template import template_fields
from schemas.layout import JOB_MANIFEST, SYNTHESIS_SPEC
from schemas.synthesis import SlotColumn, SynthesisSpec

MANIFEST_NAME, SPEC_NAME = JOB_MANIFEST, SYNTHESIS_SPEC  # in OUTPUT (schemas/layout.py)


class SlotVocabularyError(FluxbatchError, ValueError):
    """A slot's Parquet vocabulary cannot be read, lacks its column, or holds no words."""


def _draw(seed: int, index: int, what: str, modulus: int) -> int:
    """A number in [0, modulus) fixed by (seed, index, what)."""
    digest = hashlib.blake2b(f"{seed}\x1f{index}\x1f{what}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % modulus


def slot_vocabularies(spec: SynthesisSpec) -> dict[str, list[str]]:
    """Every slot's words: inline lists as given, Parquet columns read in file order (nulls and blanks dropped)."""
    words: dict[str, list[str]] = {}
    for name, source in spec.slots.items():
        words[name] = source if isinstance(source, list) else _column_words(name, source, spec.storage_options)
    return words


def _column_words(slot: str, source: SlotColumn, storage_options: dict[str, Any]) -> list[str]:
    fs, path = filesystem(source.parquet, storage_options)
    try:
        table = pq.read_table(pa.BufferReader(fs.read_bytes(path)))
    except (OSError, pa.ArrowException) as error:
        raise SlotVocabularyError(f"slot {slot!r}: cannot read {source.parquet!r}: {first_line(error)}") \
            from None
    if source.column not in table.column_names:
        raise SlotVocabularyError(f"slot {slot!r}: {source.parquet!r} has no column {source.column!r}; "
                                  f"it has: {', '.join(table.column_names)}")
    words = [str(v).strip() for v in table.column(source.column).to_pylist() if v is not None and str(v).strip()]
    if not words:
        raise SlotVocabularyError(f"slot {slot!r}: column {source.column!r} of {source.parquet!r} holds no words")
    return words


def draw_manifest(spec: SynthesisSpec, vocabularies: dict[str, list[str]] | None = None) -> pa.Table:
    """The manifest a spec draws: id, prompt, seed, num_images, template, a `slot_<name>` column per slot (by name,
    so the order slots are listed in changes nothing),
    and `label`, `label_id` when the spec names a label slot."""
    words = vocabularies if vocabularies is not None else slot_vocabularies(spec)
    labels = words[spec.label_slot] if spec.label_slot else []
    label_ids = {word: i for i, word in reversed(list(enumerate(labels)))}  # first occurrence wins
    rows = []
    for index in range(spec.prompts):
        template_index = _draw(spec.seed, index, "template", len(spec.templates))
        template = spec.templates[template_index]
        values = {slot: words[slot][_draw(spec.seed, index, f"slot:{slot}", len(words[slot]))]
                  for slot in sorted(spec.slots)}
        prompt = template.format(**{slot: values[slot] for slot in template_fields(template)})
        seed = _draw(spec.seed, index, "seed", 2**63)
        digest = hashlib.blake2b(f"{prompt}\x1f{seed}".encode(), digest_size=5).hexdigest()
        row: dict[str, Any] = {
            # The id changes with the prompt, so an edited spec re-renders exactly the prompts it changed.
            "id": f"syn-{index:08d}-{digest}",
            "prompt": prompt,
            "seed": seed,
            "num_images": spec.images_per_prompt,
            "template": template_index,
        }
        row.update({f"slot_{slot}": values[slot] for slot in sorted(spec.slots)})
        if spec.label_slot:
            row["label"] = values[spec.label_slot]
            row["label_id"] = label_ids[values[spec.label_slot]]
        rows.append(row)
    fields = [("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("num_images", pa.int32()),
              ("template", pa.int32())] + [(f"slot_{slot}", pa.string()) for slot in sorted(spec.slots)]
    if spec.label_slot:
        fields += [("label", pa.string()), ("label_id", pa.int32())]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def write_manifest(spec: SynthesisSpec, table: pa.Table) -> str:
    """Write the drawn manifest and the spec into OUTPUT; returns the manifest's URL."""
    fs, root = filesystem(spec.output.uri, spec.output.storage_options)
    from pipeline.store.ledger import parquet_bytes

    fs.write_bytes(f"{root}/{MANIFEST_NAME}", parquet_bytes(table))
    document = spec.model_dump(mode="json")  # storage options are excluded by the schema
    fs.write_bytes(f"{root}/{SPEC_NAME}", (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return fs.uri(f"{root}/{MANIFEST_NAME}")


def synthesize(spec: SynthesisSpec, *, render: bool = True, new_version: bool = False,
               progress: bool = True) -> tuple[str, RunSummary | None]:
    """Draw the manifest, write it into OUTPUT, and render it; returns the manifest URL and the run summary."""
    from jobs.refusal import restored_on_refusal
    from pipeline.store.lease import refuse_if_held
    from pipeline.store.ownership import refuse_foreign_output

    fs, root = filesystem(spec.output.uri, spec.output.storage_options)
    # Before the manifest goes into OUTPUT: render() would then find it there and could not tell it from a user's.
    refuse_foreign_output(fs, root, own={MANIFEST_NAME, SPEC_NAME})
    table = draw_manifest(spec)
    if not render:
        return write_manifest(spec, table), None
    from pipeline import render as render_job

    refuse_if_held(fs, root)  # never overwrite the manifest a running driver reads
    with restored_on_refusal(fs, root, [MANIFEST_NAME, SPEC_NAME]):  # a refused render leaves OUTPUT as it was
        manifest = write_manifest(spec, table)
        return manifest, render_job(spec.job_for(manifest), new_version=new_version, allow_non_empty_output=True,
                                    progress=progress)
