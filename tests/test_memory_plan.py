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
    KNOWN_MODELS,
    T5_XXL,
    PlanError,
    count_component,
    parse_size,
    plan_memory,
)
from jobs.plan_command import plan_main

D = 3072  # Flux.1: 24 heads x 128
KNOWN = KNOWN_MODELS  # preset -> (published configs, text length), from the model table


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


@pytest.fixture(scope="module")
def tiny_flux2(tmp_path_factory):
    from flux_worker.model_build import build_model

    return build_model(tmp_path_factory.mktemp("models") / "tiny-flux2", "tiny", family="flux.2")


@pytest.mark.parametrize(("family", "side", "batch"), [("flux.1", 64, 1), ("flux.1", 256, 2), ("flux.2", 64, 1),
                                                       ("flux.2", 256, 2)])
def test_prediction_for_the_tiny_model_matches_the_memory_a_render_allocates(request, family, side, batch):
    """Weights resident plus the peak of what encode, denoise and decode allocate, measured by torch's
    allocator through the profiler, against the planner's figure for one device with no reserve.

    Measured: every parameter's bytes, plus the most bytes of tensors live at once while the family's encode (one
    prompt at a time, as the renderer encodes), the denoising loop and the VAE decode run, from the profiler's
    allocation and free events of torch's CPU allocator. That is what the planner predicts (a GPU's
    max_memory_allocated, less the reserve); the process's RSS is not, as it also holds Python, the libraries and
    the allocator's cached pages."""
    import diffusers

    from flux_worker.families import FAMILIES
    from flux_worker.presets import resolve_preset

    folder = request.getfixturevalue("tiny_model" if family == "flux.1" else "tiny_flux2")
    text_length = resolve_preset(str(folder)).max_sequence_length
    plan = plan_memory(str(folder), parse_size("1GiB"), dtype="fp32", width=side, batch_size=batch, reserve=0)
    pipe = getattr(diffusers, FAMILIES[family].pipeline_class).from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    weights = sum(t.numel() * t.element_size() for name in plan.components
                  for t in getattr(pipe, name).parameters())

    def render() -> None:
        with torch.inference_mode():
            encodings = [FAMILIES[family].encode(pipe, "a red cat", text_length, "cpu") for _ in range(batch)]
            inputs = {name: torch.cat([e[name] for e in encodings]) for name in encodings[0]}
            pipe(**inputs, width=side, height=side, num_inference_steps=2, max_sequence_length=text_length,
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
    from pipeline.replica_shape import resolve_gpus_per_replica
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


# -- FLUX.2: [dev] and [klein], counted by hand from their configs ---------------------------------------


def flux2_transformer_by_hand(config: dict, guidance: bool) -> tuple[int, int]:
    """(all parameters, parameters the _tp_plan splits) of a Flux2Transformer2DModel: no biases anywhere."""
    d, t = config["num_attention_heads"] * config["attention_head_dim"], config["timestep_guidance_channels"]
    c, j, hd = config["in_channels"], config["joint_attention_dim"], config["attention_head_dim"]
    double = 8 * d * d + 2 * (6 * d * d + 3 * d * d)  # q k v out, added q k v out; ff and ff_context (SwiGLU, x3)
    single = (3 * d + 6 * d) * d + (d + 3 * d) * d  # to_qkv_mlp_proj (q k v + gate and up), to_out
    total = config["num_layers"] * (double + 4 * hd) + config["num_single_layers"] * (single + 2 * hd)
    total += (t * d + d * d) * (2 if guidance else 1)  # timestep (and guidance) embedders
    total += 15 * d * d  # modulation: 6d image, 6d text, 3d single-stream
    total += c * d + j * d + 2 * d * d + c * d  # x_embedder, context_embedder, norm_out, proj_out
    return total, config["num_layers"] * double + config["num_single_layers"] * single


def qwen3_by_hand(config: dict) -> int:
    h, i, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * hd  # attention, SwiGLU MLP, two norms, q/k norms
    embeddings = config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)  # lm_head unless tied
    return config["num_hidden_layers"] * layer + embeddings + h


@pytest.mark.parametrize("model", ["flux.2-dev", "flux.2-klein-4b", "flux.2-klein-9b"])
def test_flux2_parameter_counts_come_from_the_configs(model):

    configs, _ = KNOWN_MODELS[model]
    transformer = count_component("transformer", configs["transformer"])
    by_hand = flux2_transformer_by_hand(configs["transformer"], guidance=model == "flux.2-dev")
    assert (transformer.params, transformer.sharded) == by_hand
    if model != "flux.2-dev":
        assert count_component("text_encoder", configs["text_encoder"]).params == qwen3_by_hand(configs["text_encoder"])
    assert count_component("vae", configs["vae"]).params == 84_046_115


def test_published_sizes_of_flux2_match_the_counts():
    counts = {m: count_component("transformer", KNOWN[m][0]["transformer"]).params for m in KNOWN}
    assert round(counts["flux.2-dev"] / 1e9) == 32 and round(counts["flux.2-klein-9b"] / 1e9) == 9
    assert round(counts["flux.2-klein-4b"] / 1e9) == 4


@pytest.mark.parametrize(("card", "degree", "encoder"), [("24GB", 4, "CPU (offload)"), ("48GB", 2, "CPU (offload)"),
                                                         ("80GB", 1, "CPU (offload)"), ("141GB", 1, "GPU 0")])
def test_flux2_dev_across_card_sizes(card, degree, encoder):
    configs, _ = KNOWN["flux.2-dev"]
    total, sharded = flux2_transformer_by_hand(configs["transformer"], guidance=True)
    d = 48 * 128
    tokens = (1024 // 16) ** 2 + 512
    budget = parse_size(card) - GIB
    fits = [n for n in (1, 2, 3, 4, 6, 8) if (total - sharded + sharded // n) * 2 + tokens * (4 * d + 17 * d // n) * 2
            <= budget]
    plan = plan_memory("flux.2-dev", parse_size(card))

    assert plan.tp_degree == fits[0] == degree
    assert plan.where["text_encoder"] == encoder and plan.where["vae"] == "GPU 0"


def test_flux2_klein_4b_on_a_16gb_card_is_one_gpu_with_qwen3_offloaded_and_its_cost_said():
    configs, _ = KNOWN["flux.2-klein-4b"]
    transformer, _ = flux2_transformer_by_hand(configs["transformer"], guidance=False)
    qwen3 = qwen3_by_hand(configs["text_encoder"])
    vae_act = 1024 * 1024 * (3 * 256 + 2 * 128) * 2  # larger than the transformer's 4608 tokens x 21 x 3072 x 2
    plan = plan_memory("flux.2-klein-4b", parse_size("16GB"))

    assert plan.tp_degree == 1
    assert plan.where == {"transformer": "GPU 0", "text_encoder": "CPU (offload)", "vae": "GPU 0"}
    assert plan.peak_per_gpu == [transformer * 2 + 84_046_115 * 2 + vae_act + GIB]
    assert plan.cpu_bytes == qwen3 * 2
    assert plan.offload_seconds == {"text_encoder": 2 * qwen3 * 512 / 1e12}  # one multiply-add per weight per token
    assert "offloaded text_encoder: ~4.1 s of host compute per new prompt" in plan.describe()


def test_plan_says_what_it_offloaded_and_what_that_costs_per_image(capsys):
    assert plan_main(["--model", "flux.2-dev", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "offloaded text_encoder: ~25 s of host compute per new prompt (repeated prompts are cached)" in out
    plan = plan_memory("flux.1-dev", parse_size("12GB"), dtype="fp8", width=2048)
    assert plan.where["vae"] == "CPU (offload)"
    assert "offloaded vae: ~" in plan.describe() and plan.offload_seconds["vae"] > 4 * 9  # 4 MP: 4x a 1 MP decode


def test_a_family_without_tensor_parallel_replicas_is_planned_on_one_gpu_only():
    """FLUX.2 [klein] has no tensor-parallel replicas (families.py: no tp_decode), so the planner never plans a
    group for it: what `fluxbatch plan` says is what `fluxbatch render` can run."""
    small = plan_memory("flux.2-klein-9b", parse_size("16GB"))
    assert not small.fits
    assert "on one GPU, and flux.2-klein models render on one GPU per replica" in small.note
    with pytest.raises(PlanError, match="flux.2-klein models render on one GPU per replica"):
        plan_memory("flux.2-klein-4b", parse_size("16GB"), tp_degree=2)
    assert plan_memory("flux.2-klein-9b", parse_size("24GB")).tp_degree == 1
    assert plan_memory("flux.2-dev", parse_size("24GB")).tp_degree == 4  # FLUX.2 [dev] is planned on a group
