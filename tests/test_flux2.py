"""FLUX.2 [dev] and [klein] render as FLUX.1 does: built offline, rendered end to end, same guarantees.

The tiny models are built once per module (seconds); renders run through `fluxbatch render` on the session's
Ray cluster, locally and on S3 (moto).
"""

from __future__ import annotations

import json
import shutil

import pytest

from flux_worker.presets import PRESETS, UnknownModelError, resolve_preset
from flux_worker.renderer import Renderer
from pipeline.preflight import check_model
from schemas import ModelSpec, RenderOptions
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, failures, metadata
from tests.test_cli import call_cli
from tests.test_render_overlap import plan_batch

FAMILIES = ["flux.2", "flux.2-klein"]
PIPELINE_CLASSES = {"flux.2": "Flux2Pipeline", "flux.2-klein": "Flux2KleinPipeline"}
EIGHT = [{"id": f"row-{i}", "prompt": f"a lamp number {i}", "width": 64, "height": 64, "steps": 2} for i in range(8)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> a tiny random-weight model of that family, built offline by `fluxbatch model build`."""
    from jobs.cli import main

    folder = tmp_path_factory.mktemp("flux2-models")
    models = {}
    for family in FAMILIES:
        models[family] = folder / family
        assert main(["model", "build", str(models[family]), "--family", family, "--size", "tiny"]) == 0
    return models


def render_cli(capsys, manifest, out, model, *flags):
    result = call_cli(capsys, "render", str(manifest), str(out), "--model", str(model), "--no-progress", *flags)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    return result


# -- presets and folders ----------------------------------------------------------------------------


def test_flux2_presets_name_their_hub_ids_steps_and_guidance():
    dev, k4, k9 = PRESETS["flux.2-dev"], PRESETS["flux.2-klein-4b"], PRESETS["flux.2-klein-9b"]
    assert (dev.source, dev.steps, dev.guidance, dev.family) == ("black-forest-labs/FLUX.2-dev", 50, 4.0, "flux.2")
    assert (k4.source, k4.steps, k4.takes_guidance) == ("black-forest-labs/FLUX.2-klein-4B", 4, False)
    assert (k9.source, k9.steps, k9.family) == ("black-forest-labs/FLUX.2-klein-9B", 4, "flux.2-klein")
    assert {"flux.1-schnell", "flux.1-dev"} <= set(PRESETS)
    assert resolve_preset("black-forest-labs/FLUX.2-klein-4B").family == "flux.2-klein"


@pytest.mark.parametrize("family", FAMILIES)
def test_model_build_writes_a_pipeline_of_the_familys_class_that_diffusers_loads(built, family):
    import diffusers

    index = json.loads((built[family] / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[family]
    pipe = getattr(diffusers, PIPELINE_CLASSES[family]).from_pretrained(built[family])
    assert pipe.transformer.config.num_layers == 1
    assert not list(built[family].rglob("*.bin"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_local_folder_is_recognised_from_its_model_index(tmp_path, built, family):
    folder = tmp_path / "copy"
    shutil.copytree(built[family], folder)
    (folder / "fluxbatch_preset.json").unlink()  # as a downloaded snapshot: no preset of ours beside it

    preset = resolve_preset(str(folder))

    assert preset.family == family and preset.source == str(folder)


def test_a_local_folder_of_an_unknown_pipeline_class_is_refused_naming_the_supported_ones(tmp_path, built):
    folder = tmp_path / "sd"
    shutil.copytree(built["flux.2"], folder)
    (folder / "fluxbatch_preset.json").unlink()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    with pytest.raises(UnknownModelError) as error:
        check_model(ModelSpec(name=str(folder)))

    message = str(error.value)
    assert "'StableDiffusionPipeline'" in message
    assert all(name in message for name in ("FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline"))


# -- rendering --------------------------------------------------------------------------------------
# Each `fluxbatch render` that renders starts a renderer actor and loads the model (most of a test's time here),
# so one render serves several behaviours: two renders per family, plus a re-run that renders nothing.


@pytest.mark.parametrize("family", FAMILIES)
def test_renders_to_s3_and_locally_with_resume_batch_invariance_and_failure_rows(tmp_path, built, family, capsys,
                                                                                   ray_cluster, s3_env, bucket):
    """To S3 (moto) a re-run renders nothing new; a row is the same bytes alone (locally) as in a batch of eight;
    rows the family does not take (guidance on [klein], a size past the limits) are failure rows naming the field."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(write_manifest(tmp_path / "eight.parquet", EIGHT)), f"{bucket}/in/eight.parquet")
    out = f"s3://{bucket}/runs/{family}"

    # S3, in batches of eight
    first = render_cli(capsys, f"s3://{bucket}/in/eight.parquet", out, built[family], "--batch-size", "8")
    again = render_cli(capsys, f"s3://{bucket}/in/eight.parquet", out, built[family], "--batch-size", "8")

    assert first.returncode == 0 and "8 rendered" in first.stdout
    assert again.returncode == 0 and "0 rendered, 8 already done" in again.stdout
    eight = assert_images_match_metadata(out)
    assert eight.num_rows == 8
    assert set(eight.column("model_id").to_pylist()) == {"offline-tiny"}
    assert all(r.startswith("local-") for r in eight.column("model_revision").to_pylist())
    assert len(set(eight.column("sha256").to_pylist())) == 8  # eight prompts and seeds, eight images
    job = json.loads(fs.cat_file(f"{bucket}/runs/{family}/_job.json"))
    assert job["job"]["model"]["name"] == str(built[family])

    # Local output, one image per batch: row 5 alone, beside rows the family does not take (a size past its
    # limits; guidance on [klein], which is guidance-free)
    bad = [{"id": "huge", "prompt": "a cat", "width": 2048, "height": 64}]
    if family == "flux.2-klein":
        bad.append({"id": "guided", "prompt": "a cat", "width": 64, "height": 64, "guidance": 3.5})
    alone = write_manifest(tmp_path / "alone.parquet", [EIGHT[5], *bad])
    local = tmp_path / "alone"
    result = render_cli(capsys, alone, local, built[family], "--batch-size", "1")

    assert result.returncode == 1
    sha = {r["request_id"]: r["sha256"] for r in eight.to_pylist()}
    assert metadata(str(local)).column("request_id").to_pylist() == ["row-5"]
    assert assert_images_match_metadata(str(local)).column("sha256").to_pylist() == [sha["row-5"]]
    found = {(r["field"], r["reason"]) for r in failures(str(local)).to_pylist()}
    assert sorted(field for field, _ in found) == sorted("guidance" if r["id"] == "guided" else "width" for r in bad)
    reasons = " | ".join(reason for _, reason in found)
    assert "width must be between 64 and 1024" in reasons
    if family == "flux.2-klein":
        assert "guidance" in reasons and "takes no guidance" in reasons


def test_a_klein_job_on_tensor_parallel_replicas_is_refused_in_one_line_before_anything_is_written(
        tmp_path, built, capsys, ray_cluster):
    manifest = write_manifest(tmp_path / "m.parquet", EIGHT[:1])
    out = tmp_path / "out"

    result = call_cli(capsys, "render", str(manifest), str(out), "--model", str(built["flux.2-klein"]),
                      "--gpus-per-replica", "2", "--no-progress")

    assert result.returncode == 2, result.stderr[-2000:]
    assert "model family flux.2-klein (Flux2KleinPipeline) renders on one GPU per replica" in result.stderr
    assert "set gpus_per_replica 1" in result.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_is_encoded_once_and_cached_encodings_render_the_same_bytes(tmp_path, built, family):
    from flux_worker.loading import load_pipeline

    spec = ModelSpec(name=str(built[family]))
    loaded = load_pipeline(spec)
    batch = plan_batch(4, prompts=["a red fox", "a grey heron"])  # two images per prompt
    cached = Renderer(spec.model_dump(), RenderOptions(output_uri=str(tmp_path / "cached")), pipeline=loaded)
    uncached = Renderer(spec.model_dump(), RenderOptions(output_uri=str(tmp_path / "uncached"),
                                                         embedding_cache_bytes=0), pipeline=loaded)

    with_cache = cached(batch).column("sha256").to_pylist()
    without = uncached(batch).column("sha256").to_pylist()

    assert (cached.cache.misses, cached.cache.hits) == (2, 2)
    assert with_cache == without and None not in with_cache
