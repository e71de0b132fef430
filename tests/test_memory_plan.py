"""The memory planner: parameter counts from the configs, placement on a card size, and its prediction
for the tiny model checked against the memory a real render allocates on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from flux_worker.memory_plan import (
    CLIP_L,
    FLUX1_TRANSFORMER,
    FLUX1_VAE,
    GIB,
    T5_XXL,
    PlanError,
    count_component,
    parse_size,
    plan_main,
    plan_memory,
)

D = 3072  # Flux.1: 24 heads x 128


def flux1_transformer_by_hand(guidance: bool = True, double_blocks: int = 19) -> tuple[int, int]:
    """(all parameters, parameters the _tp_plan splits), from the Flux.1 config by hand."""
    double = 2 * (6 * D * D + 6 * D)  # norm1, norm1_context: D -> 6D modulation
    double += 8 * (D * D + D) + 4 * 128  # q k v, added q k v, to_out, to_add_out; four RMSNorms of head_dim
    double += 2 * (4 * D * D + 4 * D + 4 * D * D + D)  # ff and ff_context: D -> 4D -> D
    single = 3 * D * D + 3 * D  # norm: D -> 3D
    single += 3 * (D * D + D) + 2 * 128  # q k v; two RMSNorms
    single += 4 * D * D + 4 * D + 5 * D * D + D  # proj_mlp D -> 4D; proj_out 5D -> D
    embed = (256 * D + D + D * D + D) * (2 if guidance else 1)  # timestep (and guidance) embedders
    embed += 768 * D + D + D * D + D  # pooled text embedder
    embed += 4096 * D + D + 64 * D + D  # context_embedder (T5 width), x_embedder (64 latent channels)
    embed += 2 * D * D + 2 * D + 64 * D + 64  # norm_out, proj_out
    total = double_blocks * double + 38 * single + embed
    # Split: every planned Linear's weight, and the biases of column-wise ones (row-wise biases stay whole).
    sharded = double_blocks * (8 * D * D + 6 * D + 2 * (8 * D * D + 4 * D))
    sharded += 38 * (3 * D * D + 3 * D + 4 * D * D + 4 * D + 5 * D * D)
    return total, sharded


def test_flux1_parameter_counts_come_from_the_config():
    transformer = count_component("transformer", FLUX1_TRANSFORMER)
    assert (transformer.params, transformer.sharded) == flux1_transformer_by_hand()
    assert transformer.params == 11_901_408_320  # the published "12B"
    schnell = count_component("transformer", {**FLUX1_TRANSFORMER, "guidance_embeds": False})
    assert schnell.params == flux1_transformer_by_hand(guidance=False)[0]
    # T5-XXL encoder: embeddings + 24 x (attention 4 d x (heads x d_kv) + gated FFN 3 d x d_ff + 2 norms) + final norm
    t5 = 32128 * 4096 + 24 * (4 * 4096 * 64 * 64 + 3 * 4096 * 10240 + 2 * 4096) + 4096 + 32 * 64
    assert count_component("text_encoder_2", T5_XXL).params == t5
    assert count_component("text_encoder", CLIP_L).params == 123_060_480
    assert count_component("vae", FLUX1_VAE).params == 83_819_683


def test_flux1_dev_on_24gb_cards_is_two_gpus_with_the_encoders_offloaded():
    plan = plan_memory("flux.1-dev", parse_size("24GB"), dtype="bf16", width=1024, batch_size=1)

    total, sharded = flux1_transformer_by_hand()
    shard = (total - sharded + sharded // 2) * 2  # bf16: replicated part whole, planned part halved
    tokens = (1024 // 16) ** 2 + 512
    transformer_act = tokens * (4 * D + 17 * D // 2) * 2
    vae_weights, vae_act = 83_819_683 * 2, 1024 * 1024 * (3 * 256 + 2 * 128) * 2
    assert plan.tp_degree == 2
    assert plan.where == {"transformer": "GPU 0-1 (sharded)", "vae": "GPU 0", "text_encoder": "CPU (offload)",
                          "text_encoder_2": "CPU (offload)"}
    assert plan.peak_per_gpu == [shard + vae_weights + max(transformer_act, vae_act) + GIB,
                                 shard + transformer_act + GIB]
    assert plan.cpu_bytes == (123_060_480 + 4_762_310_656) * 2


def test_an_80gb_card_holds_flux1_whole_and_8gb_cards_cannot_hold_it_at_all():
    big = plan_memory("flux.1-schnell", parse_size("80GB"))
    assert big.tp_degree == 1
    assert set(big.where.values()) == {"GPU 0"}
    small = plan_memory("flux.1-schnell", parse_size("8GB"))
    assert not small.fits
    assert "even over 8 GPUs" in small.note and "fp8" in small.note


def test_flux2_dev_is_planned_from_its_configs():
    plan = plan_memory("flux.2-dev", parse_size("80GB"))
    assert plan.components["transformer"].params == 32_223_281_152
    assert plan.tp_degree == 1
    assert plan.where["text_encoder"] == "CPU (offload)"  # Mistral Small 3.1 (24B) does not fit beside it


def test_a_chosen_degree_that_does_not_divide_the_heads_is_not_a_plan():
    with pytest.raises(PlanError, match=r"do not divide the transformer's 24 attention heads"):
        plan_memory("flux.1-dev", parse_size("24GB"), tp_degree=5)


def test_planner_reads_a_local_folder(tiny_model):
    from diffusers import FluxPipeline

    plan = plan_memory(str(tiny_model), parse_size("1GiB"), dtype="fp32", width=64, reserve=0)
    pipe = FluxPipeline.from_pretrained(tiny_model)
    for name, comp in plan.components.items():
        assert comp.params == sum(p.numel() for p in getattr(pipe, name).parameters())
    assert plan.tp_degree == 1


@pytest.mark.parametrize(("side", "batch"), [(64, 1), (256, 2)])
def test_prediction_for_the_tiny_model_matches_the_memory_a_render_allocates(tiny_model, side, batch):
    """Weights resident plus the peak of what encode, denoise and decode allocate, measured by torch's
    allocator through the profiler, against the planner's figure for one device with no reserve."""
    from diffusers import FluxPipeline

    plan = plan_memory(str(tiny_model), parse_size("1GiB"), dtype="fp32", width=side, batch_size=batch, reserve=0)
    pipe = FluxPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    weights = sum(t.numel() * t.element_size() for name in plan.components
                  for t in getattr(pipe, name).parameters())

    def render() -> None:
        with torch.inference_mode():
            embeds, pooled, _ = pipe.encode_prompt(["a red cat"] * batch, None, max_sequence_length=32)
            pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=side, height=side, num_inference_steps=2,
                 generator=torch.Generator("cpu").manual_seed(0))

    measured = weights + allocated_peak(render)
    predicted = plan.peak_per_gpu[0]
    assert abs(predicted - measured) <= 0.2 * measured, (predicted, measured)


def allocated_peak(fn) -> int:
    """The most bytes `fn` held at once, from the allocation events the profiler records."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def test_plan_command_prints_the_degree_placement_and_peaks(capsys):
    assert plan_main(["--model", "flux.1-dev", "--gpu-memory", "24GB", "--resolution", "1024"]) == 0
    out = capsys.readouterr().out
    assert "tensor-parallel degree: 2 GPUs per replica" in out
    assert "text_encoder_2" in out and "CPU (offload)" in out
    assert "predicted peak per GPU: GPU 0:" in out

    assert plan_main(["--model", "flux.1-dev", "--gpu-memory", "8GB"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert plan_main(["--model", "flux.1-dev", "--gpu-memory", "80GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tp_degree"] == 1
    assert plan_main(["--model", "no-such-model", "--gpu-memory", "24GB"]) == 2


def test_memory_sizes_parse_in_binary_and_decimal_units():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("24 GB") == 24 * 10**9
    assert parse_size("80") == 80 * 2**30
    with pytest.raises(PlanError, match="write it like 24GiB"):
        parse_size("lots")


def test_gpus_per_replica_auto_asks_the_planner_simulated(ray_cluster, monkeypatch):
    """Fake GPUs have no memory to ask about, so FLUXBATCH_GPU_MEMORY stands in for a 24 GB card."""
    from flux_worker.tensor_parallel import resolve_gpus_per_replica
    from schemas import JobSpec

    monkeypatch.setenv("FLUXBATCH_GPU_MEMORY", "24GB")
    job = JobSpec.model_validate({"manifest": "m.parquet", "output": {"uri": "out"}, "model": {"name": "flux.1-dev"},
                                  "gpus_per_replica": "auto"})
    assert resolve_gpus_per_replica(job) == 2
    monkeypatch.setenv("FLUXBATCH_GPU_MEMORY", "80GB")
    assert resolve_gpus_per_replica(job) == 1


def test_recorded_parameter_counts_equal_a_fresh_count_on_the_meta_device_for_every_known_model():
    """`fluxbatch plan` reads flux_worker/param_counts.json instead of importing torch; after a diffusers or
    transformers upgrade (or an edited preset config) this fails until `python -m flux_worker.memory_plan --recount`."""
    from flux_worker.memory_plan import COUNTS_FILE, count_known_models

    assert json.loads(COUNTS_FILE.read_text()) == count_known_models(), \
        "run `python -m flux_worker.memory_plan --recount`"


def test_a_config_not_recorded_is_counted_on_the_meta_device():
    # one double block less than Flux.1: no preset has this config, so no count is recorded for it
    transformer = count_component("transformer", {**FLUX1_TRANSFORMER, "num_layers": 18})
    assert (transformer.params, transformer.sharded) == flux1_transformer_by_hand(double_blocks=18)
