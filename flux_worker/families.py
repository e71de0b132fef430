"""The one model table: every FLUX family fluxbatch renders, as data.

Each `Family` holds its diffusers pipeline class, its presets (hub id, default steps, guidance, text length,
size limits), the published component configs the memory planner counts, the offline builder that makes a
random-weight copy, how a prompt becomes the embeddings the pipeline takes, and how a tensor-parallel group
decodes its latents: each a function the entry holds (flux's `configs` hold their classes the same way).
presets.py, memory_plan.py, model_build.py, loading.py, the renderer, validation (ModelLimits) and `_job.json`
(through the preset) all read this table; nothing else lists models.

This module imports neither torch nor diffusers, so the driver and `fluxbatch plan` stay light: the encode and
decode functions only call methods of what they are handed, and a builder imports flux_worker/model_build.py
when it is called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from flux_worker.latents import decode_flux1, decode_flux2
from schemas import ModelLimits


@dataclass(frozen=True)
class ModelPreset:
    """Defaults and limits of one model family member."""

    name: str
    source: str  # hub id or local path the weights load from
    steps: int
    guidance: float
    max_sequence_length: int
    width: int = 1024
    height: int = 1024
    min_side: int = 256
    max_side: int = 2048
    max_steps: int = 200
    family: str = "flux.1"  # a FAMILIES name
    takes_guidance: bool = True  # False: a row's guidance is refused (step-distilled models ignore it)
    # How many reference images a row must and may give (its `reference_images`): none for text-only models.
    min_references: int = 0
    max_references: int = 0

    @property
    def limits(self) -> ModelLimits:
        return ModelLimits(min_side=self.min_side, max_side=self.max_side, max_steps=self.max_steps,
                           takes_guidance=self.takes_guidance, min_references=self.min_references,
                           max_references=self.max_references)


Encoding = dict[str, Any]  # pipeline keyword -> tensor of one prompt, batch dimension first


def encode_flux1(pipe: Any, prompt: str, max_sequence_length: int, device: str) -> Encoding:
    """FLUX.1: T5 sequence embeddings plus CLIP's pooled embedding (FluxPipeline.encode_prompt)."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                           max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def encode_flux2(pipe: Any, prompt: str, max_sequence_length: int, device: str) -> Encoding:
    """FLUX.2 [dev] and [klein]: one sequence embedding, no pooled one. The pipeline's own encode_prompt applies
    its text encoder's chat template (Mistral's system + [INST] turns for [dev], Qwen3's user turn with thinking
    off for [klein]) and stacks the hidden states of its chosen layers."""
    embeds, _ = pipe.encode_prompt(prompt=[prompt], device=device, max_sequence_length=max_sequence_length)
    found = {"prompt_embeds": embeds}
    if not getattr(pipe.config, "is_distilled", True):
        # An undistilled [klein] runs classifier-free guidance against the empty prompt: encode it here too, so
        # it is cached with the prompt instead of encoded again on every pipeline call.
        negative, _ = pipe.encode_prompt(prompt=[""], device=device, max_sequence_length=max_sequence_length)
        found["negative_prompt_embeds"] = negative
    return found


@dataclass(frozen=True)
class Family:
    """One model family: how to load, build, plan and prompt every member of it."""

    name: str  # what `fluxbatch model build --family` takes
    pipeline_class: str  # the diffusers class, as model_index.json's `_class_name` names it
    presets: tuple[ModelPreset, ...]
    configs: dict[str, dict[str, dict[str, Any]]]  # preset name -> component -> published config.json
    encode: Callable[[Any, str, int, str], Encoding]
    build: Callable[[Any, int], Any]  # (size, seed) -> a random-weight pipeline (flux_worker/model_build.py)
    offline: ModelPreset  # defaults of a built copy (name, source and text length are filled in by the builder)
    choose_preset: Callable[[dict[str, Any], dict[str, Any]], ModelPreset] = field(default=None, repr=False)
    # Decodes a tensor-parallel group's latents on rank 0 (flux_worker/latents.py); None: the family renders on one
    # GPU per replica only (gpus_per_replica 2+ is refused before anything starts).
    tp_decode: Callable[..., list[Any]] | None = None

    def component_class(self, component: str) -> str:
        """The diffusers class of a component (`transformer`, `vae`): the same for every member of a family."""
        return next(iter(self.configs.values()))[component]["_class_name"]

    def preset_for_folder(self, folder: Any) -> ModelPreset:
        """The preset whose defaults suit a diffusers folder of this family (a ModelFolder: local or a URL),
        pointed at the folder."""
        index = _read_json(folder, "model_index.json")
        transformer = _read_json(folder, "transformer/config.json")
        base = self.choose_preset(index, transformer) if self.choose_preset else self.presets[0]
        return replace(base, name=str(folder), source=str(folder))


def _read_json(folder: Any, rel: str) -> dict[str, Any]:
    try:
        data = folder.read_json(rel)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- the offline builders (flux_worker/model_build.py imports diffusers and torch: only a build pays for it) ------


def build_flux1(size: Any, seed: int) -> Any:
    from flux_worker.model_build import build_pipeline

    return build_pipeline(size, seed)


def build_flux2(size: Any, seed: int) -> Any:
    from flux_worker.model_build import build_flux2 as build

    return build(size, seed)


def build_flux2_klein(size: Any, seed: int) -> Any:
    from flux_worker.model_build import build_flux2_klein as build

    return build(size, seed)


def build_kontext(size: Any, seed: int) -> Any:
    from flux_worker.model_build import build_kontext as build

    return build(size, seed)


# -- the published configs (config.json of each component in the Hugging Face repos) ---------------

FLUX1_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
    "num_layers": 19, "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768,
}
CLIP_L = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
    "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 77, "num_attention_heads": 12,
    "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
}
T5_XXL = {
    "architectures": ["T5EncoderModel"], "model_type": "t5", "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "dense_act_fn": "gelu_new", "feed_forward_proj": "gated-gelu", "is_gated_act": True, "num_heads": 64,
    "num_layers": 24, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False, "vocab_size": 32128,
}
FLUX1_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
    "use_post_quant_conv": False, "mid_block_add_attention": True,
}
FLUX2_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [32, 32, 32, 32],
    "eps": 1e-06, "guidance_embeds": True, "in_channels": 128, "joint_attention_dim": 15360, "mlp_ratio": 3.0,
    "num_attention_heads": 48, "num_layers": 8, "num_single_layers": 48, "patch_size": 1, "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
MISTRAL_SMALL_3_1 = {
    "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
    "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
    "vision_feature_layer": -1, "tie_word_embeddings": False,
    "text_config": {
        "model_type": "mistral", "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 32768, "max_position_embeddings": 131072, "num_attention_heads": 32,
        "num_hidden_layers": 40, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0,
        "sliding_window": None, "vocab_size": 131072,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "pixtral", "head_dim": 64, "hidden_act": "silu", "hidden_size": 1024, "image_size": 1540,
        "intermediate_size": 4096, "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24,
        "patch_size": 14, "rope_theta": 10000.0,
    },
}
FLUX2_VAE = {
    "_class_name": "AutoencoderKLFlux2", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 32, "layers_per_block": 2, "norm_num_groups": 32,
    "patch_size": [2, 2], "sample_size": 1024, "use_quant_conv": True, "use_post_quant_conv": True,
}
# [klein]: the FLUX.2 VAE, a smaller transformer without the guidance embedding (step- and guidance-distilled),
# and a Qwen3 text encoder whose layers 9, 18 and 27 are stacked (3 x hidden = joint_attention_dim).
KLEIN_4B_TRANSFORMER = {
    **FLUX2_TRANSFORMER, "guidance_embeds": False, "joint_attention_dim": 7680, "num_attention_heads": 24,
    "num_layers": 5, "num_single_layers": 20,
}
KLEIN_9B_TRANSFORMER = {
    **FLUX2_TRANSFORMER, "guidance_embeds": False, "joint_attention_dim": 12288, "num_attention_heads": 32,
    "num_layers": 8, "num_single_layers": 24,
}
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960, "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
    "tie_word_embeddings": True, "vocab_size": 151936,
}
QWEN3_8B = {
    **QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False,
}


def _flux1_preset(index: dict[str, Any], transformer: dict[str, Any]) -> ModelPreset:
    # schnell is the FLUX.1 transformer without the guidance embedding
    return PRESETS_BY_NAME["flux.1-dev" if transformer.get("guidance_embeds", False) else "flux.1-schnell"]


def _klein_preset(index: dict[str, Any], transformer: dict[str, Any]) -> ModelPreset:
    base = PRESETS_BY_NAME["flux.2-klein-9b" if transformer.get("num_attention_heads") == 32 else "flux.2-klein-4b"]
    if index.get("is_distilled", True):
        return base
    # [klein] Base: not distilled, so it takes guidance (classifier-free, against the empty prompt) and more steps
    return replace(base, steps=50, guidance=4.0, takes_guidance=True)


FLUX1 = Family(
    name="flux.1",
    pipeline_class="FluxPipeline",
    presets=(
        ModelPreset(name="flux.1-schnell", source="black-forest-labs/FLUX.1-schnell", steps=4, guidance=0.0,
                    max_sequence_length=256),
        ModelPreset(name="flux.1-dev", source="black-forest-labs/FLUX.1-dev", steps=28, guidance=3.5,
                    max_sequence_length=512),
    ),
    configs={
        "flux.1-dev": {"transformer": FLUX1_TRANSFORMER, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL,
                       "vae": FLUX1_VAE},
        "flux.1-schnell": {"transformer": {**FLUX1_TRANSFORMER, "guidance_embeds": False}, "text_encoder": CLIP_L,
                           "text_encoder_2": T5_XXL, "vae": FLUX1_VAE},
    },
    encode=encode_flux1,
    build=build_flux1,
    offline=ModelPreset(name="", source="", steps=4, guidance=3.5, max_sequence_length=0, min_side=64,
                        max_side=1024),
    choose_preset=_flux1_preset,
    tp_decode=decode_flux1,
)
# Reference images a row may give: FLUX.2 [dev] takes up to 10, [klein] up to 4 (Black Forest Labs' model cards).
FLUX2_REFERENCES = 10
KLEIN_REFERENCES = 4
FLUX2 = Family(
    name="flux.2",
    pipeline_class="Flux2Pipeline",
    presets=(
        # Model card: 50 steps, guidance 4 (guidance-distilled: an embedded scale, one transformer call per step).
        ModelPreset(name="flux.2-dev", source="black-forest-labs/FLUX.2-dev", steps=50, guidance=4.0,
                    max_sequence_length=512, family="flux.2", max_references=FLUX2_REFERENCES),
    ),
    configs={"flux.2-dev": {"transformer": FLUX2_TRANSFORMER, "text_encoder": MISTRAL_SMALL_3_1, "vae": FLUX2_VAE}},
    encode=encode_flux2,
    build=build_flux2,
    offline=ModelPreset(name="", source="", steps=4, guidance=4.0, max_sequence_length=0, min_side=64,
                        max_side=1024, family="flux.2", max_references=FLUX2_REFERENCES),
    tp_decode=decode_flux2,
)
FLUX2_KLEIN = Family(
    name="flux.2-klein",
    pipeline_class="Flux2KleinPipeline",
    presets=(
        # Model cards: 4 steps, guidance 1.0 (step-distilled: the pipeline ignores guidance, so rows may not set it).
        ModelPreset(name="flux.2-klein-4b", source="black-forest-labs/FLUX.2-klein-4B", steps=4, guidance=1.0,
                    max_sequence_length=512, family="flux.2-klein", takes_guidance=False,
                    max_references=KLEIN_REFERENCES),
        ModelPreset(name="flux.2-klein-9b", source="black-forest-labs/FLUX.2-klein-9B", steps=4, guidance=1.0,
                    max_sequence_length=512, family="flux.2-klein", takes_guidance=False,
                    max_references=KLEIN_REFERENCES),
    ),
    configs={
        "flux.2-klein-4b": {"transformer": KLEIN_4B_TRANSFORMER, "text_encoder": QWEN3_4B, "vae": FLUX2_VAE},
        "flux.2-klein-9b": {"transformer": KLEIN_9B_TRANSFORMER, "text_encoder": QWEN3_8B, "vae": FLUX2_VAE},
    },
    encode=encode_flux2,
    build=build_flux2_klein,
    offline=ModelPreset(name="", source="", steps=4, guidance=1.0, max_sequence_length=0, min_side=64,
                        max_side=1024, family="flux.2-klein", takes_guidance=False, max_references=KLEIN_REFERENCES),
    choose_preset=_klein_preset,
)

# FLUX.1 Kontext [dev]: FLUX.1 [dev]'s architecture (the same component configs), trained to edit one reference
# image from an instruction; its pipeline concatenates the reference's latents to the sequence. Model card and
# diffusers' docs: 28 steps, guidance 2.5.
FLUX1_KONTEXT = Family(
    name="flux.1-kontext",
    pipeline_class="FluxKontextPipeline",
    presets=(
        ModelPreset(name="flux.1-kontext-dev", source="black-forest-labs/FLUX.1-Kontext-dev", steps=28,
                    guidance=2.5, max_sequence_length=512, family="flux.1-kontext", min_references=1,
                    max_references=1),
    ),
    configs={"flux.1-kontext-dev": FLUX1.configs["flux.1-dev"]},
    encode=encode_flux1,
    build=build_kontext,
    offline=ModelPreset(name="", source="", steps=4, guidance=2.5, max_sequence_length=0, min_side=64,
                        max_side=1024, family="flux.1-kontext", min_references=1, max_references=1),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1, FLUX2, FLUX2_KLEIN, FLUX1_KONTEXT)}
PRESETS_BY_NAME: dict[str, ModelPreset] = {p.name: p for f in FAMILIES.values() for p in f.presets}
PIPELINE_CLASSES: tuple[str, ...] = tuple(f.pipeline_class for f in FAMILIES.values())


def family_of(preset: ModelPreset) -> Family:
    """The family a preset belongs to."""
    return FAMILIES[preset.family]


def family_for_class(class_name: Any) -> Family | None:
    """The family whose pipeline class model_index.json names, or None for a class fluxbatch does not render."""
    return next((f for f in FAMILIES.values() if f.pipeline_class == class_name), None)


def preset_for_hub_id(repo_id: str) -> ModelPreset | None:
    """The preset whose hub id this is (case aside), or None."""
    lowered = repo_id.lower()
    return next((p for p in PRESETS_BY_NAME.values() if p.source.lower() == lowered), None)


def published_configs(model: str) -> tuple[dict[str, dict[str, Any]], int] | None:
    """The planner's components and text length for a preset name or its hub id; None for anything else."""
    preset = PRESETS_BY_NAME.get(model) or preset_for_hub_id(model)
    if preset is None:
        return None
    return family_of(preset).configs[preset.name], preset.max_sequence_length
