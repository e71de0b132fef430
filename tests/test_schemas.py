"""Manifest rows and job specs: each bad field is refused with a message that names it."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from pipeline.plan import derived_seed, image_key
from schemas import JobSpec, ModelLimits, RenderRequest, row_errors
from schemas.request import WHITESPACE


def errors_of(row: dict, limits: ModelLimits | None = None) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        RenderRequest.model_validate(row, context={"limits": limits or ModelLimits()})
    return {e.field: e.reason for e in row_errors(caught.value)}


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"prompt": "x", "width": 1000}, "width", "width must be a multiple of 16, got 1000"),
        ({"prompt": "x", "height": 4096}, "height", "height must be between 256 and 2048 for this model, got 4096"),
        ({"prompt": "x", "steps": 0}, "steps", "steps must be between 1 and 200, got 0"),
        ({"prompt": "x", "guidance": float("nan")}, "guidance", "guidance must be a finite number, got nan"),
        ({"prompt": "x", "seed": -1}, "seed", "seed must be an unsigned 64-bit integer (0 to 2**64-1), got -1"),
        ({"prompt": "x", "num_images": 65}, "num_images", "num_images must be between 1 and 64, got 65"),
        ({"prompt": ""}, "prompt", "prompt is empty"),
        ({"prompt": None}, "prompt", "prompt must be text, got null"),
        ({"prompt": "a\x00b"}, "prompt", "prompt contains control characters (only tab and newline are allowed)"),
        ({"prompt": "x" * 4001}, "prompt", "prompt is 4001 characters; at most 4000 are allowed"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "output_format must be one of png, jpeg, webp; "
                                                                    "got 'gif'"),
        ({"prompt": "x", "width": 512.5}, "width", "width must be an integer, got 512.5"),
        ({"prompt": "x", "adapters": [{"name": "a", "scale": float("inf")}]}, "adapters",
         "adapters.0.scale: adapter scale must be a finite number in [-10, 10], got inf"),
    ],
)
def test_bad_field_is_refused_with_a_message_naming_it(row, field, message):
    assert errors_of(row)[field] == message


def test_sizes_are_checked_against_the_models_own_range():
    assert errors_of({"prompt": "x", "width": 128}, ModelLimits(min_side=256, max_side=2048))["width"].startswith(
        "width must be between 256 and 2048")
    RenderRequest.model_validate({"prompt": "x", "width": 64}, context={"limits": ModelLimits(min_side=64)})


def test_integral_floats_from_parquet_are_accepted_as_integers():
    request = RenderRequest.model_validate({"prompt": "x", "width": 512.0, "seed": 7.0, "num_images": None})
    assert (request.width, request.seed, request.num_images) == (512, 7, 1)


def test_whitespace_spelled_out_for_the_column_checks_is_what_str_strip_removes():
    assert set(WHITESPACE) == {c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()}


def test_keys_and_seeds_are_deterministic_and_distinct_per_variant():
    assert image_key("row-1", 0) == image_key("row-1", 0)
    assert image_key("row-1", 0) != image_key("row-1", 1)
    assert len(image_key("../../etc/passwd", 0)) == 32
    assert derived_seed(image_key("a", 0)) == derived_seed(image_key("a", 0)) < 2**63


def test_job_yaml_is_overridden_by_flags(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("manifest: m.parquet\noutput: {uri: out}\nmodel: {name: flux.1-dev}\nreplicas: 2\n")
    job = JobSpec.from_yaml(spec, **{"replicas": 5, "model.dtype": "bf16", "batch_size": None})
    assert (job.replicas, job.model.name, job.model.dtype, job.batch_size) == (5, "flux.1-dev", "bf16", 4)


def test_storage_option_flags_reach_input_and_output_and_the_endpoint_nests_for_s3fs():
    from jobs.storage_options import apply_storage_options

    job = JobSpec.model_validate({"manifest": "m", "output": {"uri": "s3://b/o", "storage_options": {"anon": True}}})
    apply_storage_options(job, ["endpoint_url=http://127.0.0.1:9000", "use_ssl=false"])

    assert job.storage_options == {"use_ssl": False, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    assert job.output.storage_options == {"anon": True, **job.storage_options}
    with pytest.raises(ValueError, match="--storage-option 'region': expected key=value"):
        apply_storage_options(job, ["region"])


def test_storage_credentials_are_not_part_of_a_dumped_job():
    job = JobSpec.model_validate({"manifest": "m", "output": {"uri": "s3://b/o", "storage_options": {
        "secret": "hunter2"}}, "storage_options": {"secret": "hunter2"}})
    assert "hunter2" not in job.model_dump_json()
    assert "hunter2" not in repr(job)
    assert "hunter2" not in str(job.identity())
