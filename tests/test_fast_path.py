"""Each GPU fast-path option of the model spec loads and renders on the tiny offline model, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from flux_worker import fast_path
from flux_worker.fast_path import FastPathError
from flux_worker.loading import load_pipeline
from schemas import JobSpec, ModelSpec

SIDE = 64


def render(pipe, seed: int = 7, steps: int = 3) -> np.ndarray:
    """One image as float pixels in [0, 1], from a fixed seed."""
    with torch.inference_mode():
        out = pipe(prompt="a lighthouse at dusk", width=SIDE, height=SIDE, num_inference_steps=steps,
                   guidance_scale=3.5, max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(seed),
                   output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def baseline(tiny_model) -> np.ndarray:
    pipe, _ = load_pipeline(ModelSpec(name=str(tiny_model)))
    return render(pipe)


def test_fused_qkv_renders_what_separate_projections_render(tiny_model, baseline):
    pipe, _ = load_pipeline(ModelSpec(name=str(tiny_model), fuse_qkv=True))

    assert any(getattr(m, "fused_projections", False) for m in pipe.transformer.modules())
    image = render(pipe)
    assert image.shape == (SIDE, SIDE, 3)
    np.testing.assert_allclose(image, baseline, atol=1e-4)  # one matmul instead of three: last bits only


def test_first_block_cache_with_a_tiny_threshold_skips_nothing_and_changes_nothing(tiny_model, baseline):
    pipe, _ = load_pipeline(ModelSpec(name=str(tiny_model), cache="first-block", cache_threshold=1e-9))

    assert pipe.transformer.is_cache_enabled
    np.testing.assert_array_equal(render(pipe), baseline)


def test_first_block_cache_with_a_loose_threshold_reuses_blocks_and_still_renders(tiny_model, baseline):
    pipe, _ = load_pipeline(ModelSpec(name=str(tiny_model), cache="first-block", cache_threshold=1.0))

    image = render(pipe, steps=6)
    assert image.shape == (SIDE, SIDE, 3) and np.isfinite(image).all()
    uncached, _ = load_pipeline(ModelSpec(name=str(tiny_model)))
    assert not np.array_equal(image, render(uncached, steps=6)), "a threshold of 1.0 must skip some blocks"


@pytest.mark.slow
def test_compiled_blocks_render_what_eager_blocks_render(tiny_model, baseline):
    torch._dynamo.reset()
    pipe, _ = load_pipeline(ModelSpec(name=str(tiny_model), compile=True))

    compiled = [m for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == 2  # one double-stream and one single-stream block in the tiny model
    np.testing.assert_allclose(render(pipe), baseline, atol=1e-3)  # inductor reorders float sums


def test_fp8_on_cpu_is_refused_with_a_message_naming_the_fix(tiny_model):
    with pytest.raises(FastPathError, match=r"quantize='fp8' needs a GPU with fp8 matmuls .* renders on cpu"):
        load_pipeline(ModelSpec(name=str(tiny_model), quantize="fp8"))


def test_fp8_job_without_gpus_is_refused_before_anything_loads():
    with pytest.raises(ValidationError, match="set gpus_per_replica"):
        JobSpec.model_validate({"manifest": "m.parquet", "output": {"uri": "out"}, "model": {"quantize": "fp8"}})


def test_fuse_qkv_and_fp8_refuse_adapters_they_would_break():
    with pytest.raises(ValidationError, match="fuse_qkv cannot be combined with model.adapters"):
        ModelSpec(fuse_qkv=True, adapters={"style": "style.safetensors"})
    with pytest.raises(ValidationError, match="quantize='fp8' cannot be combined"):
        ModelSpec(quantize="fp8", adapters={"style": "style.safetensors"})


def test_fp8_on_a_simulated_fp8_gpu_quantizes_every_linear_and_renders(tiny_model, monkeypatch):
    """Simulated: the device check says yes and torchao's hardware assertion is lifted, so torchao's
    float8 tensors run its reference (non-kernel) matmul on CPU; the code path is the GPU one."""
    pytest.importorskip("torchao")
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import Float8Tensor

    monkeypatch.setattr(fast_path, "fp8_supported", lambda device: True)
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)

    pipe, _ = load_pipeline(ModelSpec(name=str(tiny_model), dtype="bf16", quantize="fp8"))

    linears = [m for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear)]
    fp8 = [m for m in linears if isinstance(m.weight, Float8Tensor)]
    assert fp8 and len(fp8) == sum(fast_path._fp8_layer(m, "") for m in linears)
    image = render(pipe)
    assert image.shape == (SIDE, SIDE, 3) and np.isfinite(image).all()
