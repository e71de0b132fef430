"""Tensor-parallel replicas of FLUX.2 on CPU: gloo instead of NCCL, Ray's fake GPUs instead of real ones.

A TP-2 and a TP-4 group of a tiny flux.2 model (4 heads, so TP-4 splits whole heads) render the images one
device renders (fp32, within 1/255), with the text encoder and the VAE where the memory planner's plan puts
them. Each group is built from the very stage value the driver hands to Ray Data (`render_stage`), and fed a
planned batch as Ray Data would, so the test can then ask the ranks what they hold; the driver's pool around a
group is the same for every family and is rendered end to end by tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import ray
from PIL import Image

from flux_worker.memory_plan import parse_size, placement_of, plan_memory
from flux_worker.model_build import build_model
from flux_worker.renderer import Renderer
from pipeline.cluster.resources import replica_ask
from pipeline.render_stage import render_stage
from schemas import PLAN_SCHEMA, JobSpec, RenderOptions
from tests.test_tensor_parallel import FOUR_HEADS, _assert_same_images

# Two shapes (square and wide, so the position ids that unpack FLUX.2's tokens are checked off the diagonal) and a
# prompt used twice (the encoder rank's cache).
IMAGES = [("a red cat", 64, 64, 11), ("a red cat", 64, 64, 12), ("a blue dog on a hill", 96, 64, 13)]


@pytest.fixture(scope="module")
def flux2_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("models") / "flux2-four-heads", FOUR_HEADS, family="flux.2")


@pytest.fixture(scope="module")
def batch() -> pa.Table:
    """The planned images, as the driver hands them to a replica."""
    rows = [
        {"key": hashlib.blake2b(f"f2-{i}".encode(), digest_size=16).hexdigest(), "request_id": f"r{i}",
         "variant": 0, "prompt": prompt, "width": width, "height": height, "steps": 2, "guidance": 4.0, "seed": seed,
         "max_sequence_length": 64, "adapters": [], "output_format": "png", "source": "m.parquet", "row": i}
        for i, (prompt, width, height, seed) in enumerate(IMAGES)
    ]
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


@pytest.fixture(scope="module")
def single_device(flux2_model, batch, tmp_path_factory):
    """The reference: the batch rendered by one replica on one device; and its transformer's parameter count."""
    renderer = Renderer({"name": str(flux2_model), "dtype": "fp32"},
                        RenderOptions(output_uri=str(tmp_path_factory.mktemp("single"))))
    pixels = _pixels(renderer(batch))
    return pixels, sum(p.numel() for p in renderer.pipe.transformer.parameters())


def _pixels(result: pa.Table) -> dict[str, np.ndarray]:
    """key -> the pixels of the image file a result row points at; every row must have one."""
    assert result.column("error").null_count == result.num_rows, result.column("error").to_pylist()
    pixels = {}
    for row in result.to_pylist():
        with Image.open(row["image_uri"]) as image:
            pixels[row["key"]] = np.asarray(image.convert("RGB"), dtype=np.int16)
    return pixels


def _job(model, out, degree: int) -> JobSpec:
    return JobSpec.model_validate({"manifest": "m.parquet", "output": {"uri": str(out)},
                                   "model": {"name": str(model), "dtype": "fp32"}, "gpus_per_replica": degree})


def _render_with_group(job: JobSpec, batch: pa.Table):
    """The group Ray Data would start for `job`, fed `batch`: (result table, what each rank holds, its placement)."""
    from pipeline.replica_shape import resolve_gpus_per_replica

    stage = render_stage(job, replica_ask(job, resolve_gpus_per_replica(job), 4), env_vars={})
    replica = stage.member(**stage.fn_constructor_kwargs).member  # the TensorParallelReplica a pool member builds
    try:
        return replica(batch), replica.holdings(), stage.group["placement"]
    finally:
        for rank in replica.ranks:
            ray.kill(rank)
        ray.util.remove_placement_group(replica.group)


def _holders(holdings: list[dict], component: str) -> list[int]:
    return [rank for rank, held in enumerate(holdings) if component in held]


@pytest.mark.slow
def test_flux2_tp2_replica_renders_the_single_device_images_with_the_text_encoder_on_the_gpu_the_plan_names(
        tmp_path, flux2_model, batch, single_device, monkeypatch):
    monkeypatch.setenv("FLUXBATCH_GPU_MEMORY", "24GB")  # room everywhere: the planner picks a GPU of the group
    job = _job(flux2_model, tmp_path / "tp2", 2)
    plan = plan_memory(str(flux2_model), parse_size("24GB"), dtype="fp32", width=64, tp_degree=2)
    assert plan.where["text_encoder"] == "GPU 1" and plan.where["vae"] == "GPU 0"  # the GPU without the VAE

    result, holdings, placement = _render_with_group(job, batch)

    assert placement == placement_of(plan) == {"encoder_rank": 1, "encoder_device": "gpu", "vae_device": "gpu"}
    assert _holders(holdings, "text_encoder") == [1] and _holders(holdings, "vae") == [0]
    assert all(held["text_encoder"] == held["transformer"] for held in holdings if "text_encoder" in held)
    pixels, whole = single_device
    assert all(held["transformer_parameters"] < whole for held in holdings), "a rank holds the whole transformer"
    _assert_same_images(pixels, _pixels(result))


@pytest.mark.slow
def test_flux2_tp4_replica_renders_the_single_device_images_with_the_text_encoder_offloaded_as_planned(
        tmp_path, flux2_model, batch, single_device, monkeypatch):
    # A card with room for rank 0's shard, VAE and decode but not for the text encoder beside a shard anywhere:
    # the planner offloads it to the host.
    roomy = plan_memory(str(flux2_model), parse_size("24GB"), dtype="fp32", width=64, tp_degree=4)
    card = roomy.peak_per_gpu[0]
    plan = plan_memory(str(flux2_model), card, dtype="fp32", width=64, tp_degree=4)
    assert plan.where["text_encoder"] == "CPU (offload)" and plan.where["vae"] == "GPU 0", plan.describe()
    monkeypatch.setenv("FLUXBATCH_GPU_MEMORY", f"{card}b")

    result, holdings, placement = _render_with_group(_job(flux2_model, tmp_path / "tp4", 4), batch)

    assert placement == placement_of(plan) == {"encoder_rank": 0, "encoder_device": "cpu", "vae_device": "gpu"}
    assert _holders(holdings, "text_encoder") == [0] and holdings[0]["text_encoder"] == "cpu"
    pixels, whole = single_device
    shards = [held["transformer_parameters"] for held in holdings]
    assert max(shards) < whole and len(set(shards)) == 1
    _assert_same_images(pixels, _pixels(result))
