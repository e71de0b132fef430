"""Tensor-parallel replicas on CPU: gloo instead of NCCL, Ray's fake GPUs instead of real ones.

A group of N rank actors shards the transformer with diffusers' `_tp_plan` and must render the very
images a single device renders (fp32, within 1/255); groups are packed onto one node each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from flux_worker.model_build import OfflineSize, build_model
from pipeline import render
from tests.conftest import write_manifest
from tests.helpers import assert_images_match_metadata, metadata

# Flux.1's architecture with 4 heads (the `tiny` size has 2): each rank of a TP-2 group takes two whole heads.
# A TP-4 group renders in tests/test_flux2_tensor_parallel.py; the group code is one for both families.
FOUR_HEADS = OfflineSize(text_width=32, text_layers=2, heads=4, head_dim=8, axes_dims_rope=(2, 2, 4),
                         double_blocks=1, single_blocks=1, vae_channels=8, max_sequence_length=32, side=64)
ROWS = [
    {"id": "cat", "prompt": "a red cat", "width": 64, "height": 64, "num_images": 2},
    {"id": "dog", "prompt": "a blue dog on a hill", "width": 96, "height": 64},
    {"id": "owl", "prompt": "an owl at night", "width": 64, "height": 64, "seed": 7},
]


@pytest.fixture(scope="module")
def four_head_model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("models") / "four-heads", FOUR_HEADS)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("manifest") / "m.parquet", ROWS)


@pytest.fixture(scope="module")
def single_device_images(ray_cluster, four_head_model, manifest, tmp_path_factory):
    """The reference: the same rows rendered by one replica on one device."""
    out = tmp_path_factory.mktemp("single")
    render(_job(manifest, out, four_head_model, gpus_per_replica=0), progress=False)
    return _pixels(out)


def _job(manifest, out, model, **fields):
    from schemas import JobSpec

    data = {"manifest": str(manifest), "output": {"uri": str(out)}, "model": {"name": str(model), "dtype": "fp32"}}
    return JobSpec.model_validate({**data, **fields})


def _pixels(out) -> dict[str, np.ndarray]:
    table = assert_images_match_metadata(str(out))
    pixels = {}
    for row in table.to_pylist():
        with Image.open(row["image_uri"]) as image:
            pixels[row["key"]] = np.asarray(image.convert("RGB"), dtype=np.int16)
    return pixels


def _assert_same_images(expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for key, pixels in expected.items():
        assert got[key].shape == pixels.shape
        assert np.abs(got[key] - pixels).max() <= 1, f"image {key} differs by more than 1/255"
    assert any(p.std() > 5 for p in expected.values()), "the reference images are flat; the check would be empty"


@pytest.mark.slow
def test_two_tp2_replicas_render_side_by_side_the_single_device_images(tmp_path, single_device_images,
                                                                      four_head_model, manifest):
    out = tmp_path / "tp2x2"
    summary = render(_job(manifest, out, four_head_model, gpus_per_replica=2, replicas=2, batch_size=1),
                     progress=False)

    assert (summary.images_rendered, summary.images_failed) == (4, 0)
    _assert_same_images(single_device_images, _pixels(out))
    # Each image is written by the rank 0 of the group that rendered it: two groups, two writers.
    assert len(set(metadata(str(out)).column("worker").to_pylist())) == 2


def test_uneven_tp_degree_is_refused_with_the_degrees_that_work():
    from flux_worker.tensor_parallel import TensorParallelError, check_divisible

    check_divisible({"num_attention_heads": 24}, 4)
    with pytest.raises(TensorParallelError, match=r"does not divide the transformer's 24 attention heads"):
        check_divisible({"num_attention_heads": 24}, 5)


@pytest.mark.slow
def test_no_group_spans_nodes_on_a_two_node_cluster():
    """Two nodes of 3 (fake) GPUs: two TP-2 groups land one per node, and a third, which would have
    to span the nodes, is refused instead. Own process: Ray is initialised once per process."""
    script = textwrap.dedent("""
        import json, os
        os.environ["FLUXBATCH_TP_READY_SECONDS"] = "5"
        import ray
        from ray.cluster_utils import Cluster
        from flux_worker.tensor_parallel import TensorParallelError, form_group

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 3})
        cluster.add_node(num_cpus=3, num_gpus=3)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        cluster.wait_for_nodes()
        groups = [form_group(2, cpus_per_rank=1) for _ in range(2)]
        nodes = [ray.get([r.node_id.remote() for r in ranks]) for _, ranks in groups]
        try:
            form_group(2, cpus_per_rank=1)
            third = "formed"
        except TensorParallelError as error:
            third = str(error)
        print("RESULT" + json.dumps({"nodes": nodes, "third": third}))
        ray.shutdown()
        cluster.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[0].removeprefix("RESULT"))
    first, second = result["nodes"]
    assert len(set(first)) == 1 and len(set(second)) == 1, "a group's ranks sit on different nodes"
    assert first[0] != second[0], "both groups on one node, which has only 3 GPUs"
    assert "a group never spans nodes" in result["third"]
