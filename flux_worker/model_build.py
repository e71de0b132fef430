"""Build a random-weight pipeline of any family in the model table offline, in the diffusers folder format.

No hub: the tokenizers are made from a small character vocabulary, the encoders, transformer and
VAE from configs. `tiny` renders in milliseconds for tests; `bench` takes a fraction of a second per
image on two CPU cores, which makes fluxbatch's own overhead measurable against the model's time.
Each family's entry (flux_worker/families.py) names its builder here: `build_pipeline` (FLUX.1),
`build_flux2` (FLUX.2 [dev]: Mistral3 text encoder), `build_flux2_klein` (FLUX.2 [klein]: Qwen3) and
`build_kontext` (FLUX.1 Kontext: FLUX.1's components in FluxKontextPipeline).
"""

from __future__ import annotations

import string
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flux_worker.families import FAMILIES
from flux_worker.presets import write_preset


@dataclass(frozen=True)
class OfflineSize:
    """Dimensions of a random-weight model; the architecture is Flux.1's, only narrower and shallower."""

    text_width: int
    text_layers: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    double_blocks: int
    single_blocks: int
    vae_channels: int
    max_sequence_length: int
    side: int  # default image side


SIZES: dict[str, OfflineSize] = {
    "tiny": OfflineSize(32, 2, 2, 16, (4, 4, 8), 1, 1, 8, 32, 64),
    "bench": OfflineSize(64, 2, 4, 64, (16, 24, 24), 2, 4, 32, 64, 256),
}


def _clip_tokenizer() -> CLIPTokenizer:
    # Byte-level BPE with no merges: every byte is a token, so any text tokenizes.
    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(ch, -2.0) for ch in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _dims(size: str | OfflineSize) -> OfflineSize:
    if isinstance(size, OfflineSize):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size]


def build_pipeline(size: str | OfflineSize = "tiny", seed: int = 0) -> FluxPipeline:
    """A random-weight FluxPipeline of the given size (a name in SIZES or your own), the same weights per seed."""
    dims = _dims(size)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=dims.text_width,
            intermediate_size=dims.text_width * 2,
            num_attention_heads=4,
            num_hidden_layers=dims.text_layers,
            projection_dim=dims.text_width,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=dims.text_width,
            d_kv=dims.text_width // 4,
            d_ff=dims.text_width * 2,
            num_layers=dims.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=dims.double_blocks,
        num_single_layers=dims.single_blocks,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=dims.text_width,
        pooled_projection_dim=dims.text_width,
        guidance_embeds=True,
        axes_dims_rope=list(dims.axes_dims_rope),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[dims.vae_channels] * 4,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=min(dims.vae_channels, 32),
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        vae=vae,
    )


def build_kontext(size: str | OfflineSize = "tiny", seed: int = 0) -> FluxKontextPipeline:
    """A random-weight FLUX.1 Kontext pipeline: FLUX.1's components (the same weights per seed), Kontext's pipeline."""
    return FluxKontextPipeline(**build_pipeline(size, seed).components)


# -- FLUX.2 ------------------------------------------------------------------------------------------

# The FLUX.2 pipelines stack the hidden states of these text-encoder layers (their encode_prompt defaults),
# so a random-weight encoder needs one more layer than the last of them, however narrow it is.
MISTRAL_LAYERS = 30 + 1  # Flux2Pipeline: layers 10, 20, 30
QWEN3_LAYERS = 27 + 1  # Flux2KleinPipeline: layers 9, 18, 27
# Mistral's [dev] chat template: a system turn then the user's [INST] turn. The offline tokenizer spells one
# character per token, so its template keeps the system turn's markers and drops the system text (the pipeline's
# ~200 characters), which would otherwise fill a tiny model's whole text length.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT][/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}"
    "[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
# Qwen3's template as [klein] calls it: the user turn, then the assistant's with thinking switched off.
QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_tokenizer(specials: list[str], template: str, *, bos: str | None, eos: str, pad: str) -> Qwen2TokenizerFast:
    """A byte-level BPE tokenizer with no merges (every byte a token, so any text tokenizes), its chat markers as
    single special tokens, and a chat template: what FLUX.2's pipelines call on Mistral's and Qwen3's."""
    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({token: len(alphabet) + i for i, token in enumerate(specials)})
    markers = [t for t in specials if t not in (bos, eos, pad)]
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=bos, eos_token=eos,
                                   pad_token=pad, extra_special_tokens=markers, model_max_length=2048)
    tokenizer.chat_template = template
    return tokenizer


def _flux2_parts(dims: OfflineSize, guidance: bool) -> dict:
    """The transformer, VAE and scheduler both FLUX.2 pipelines share, at `dims`."""
    quarter = dims.head_dim // 4  # FLUX.2 ropes four axes (time, height, width, layer)
    transformer = Flux2Transformer2DModel(
        in_channels=4 * 4,  # the VAE's latent channels in 2x2 patches
        num_layers=dims.double_blocks,
        num_single_layers=dims.single_blocks,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=3 * dims.text_width,  # three encoder layers stacked
        timestep_guidance_channels=32,
        axes_dims_rope=(quarter,) * 4,
        guidance_embeds=guidance,
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(dims.vae_channels,) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(dims.vae_channels, 32),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler}


def build_flux2(size: str | OfflineSize = "tiny", seed: int = 0) -> Flux2Pipeline:
    """A random-weight FLUX.2 [dev] pipeline: Mistral3 text encoder (with its small Pixtral vision tower)."""
    dims = _dims(size)
    torch.manual_seed(seed)
    specials = ["<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tokenizer = _byte_tokenizer(specials, MISTRAL_TEMPLATE, bos="<s>", eos="</s>", pad="<pad>")
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": dims.text_width,
                     "intermediate_size": dims.text_width * 2, "num_hidden_layers": MISTRAL_LAYERS,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": dims.text_width // 4,
                     "max_position_embeddings": 2048},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "head_dim": 8, "image_size": 32, "patch_size": 16},
        image_token_index=0, spatial_merge_size=1,
    ))
    return Flux2Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, **_flux2_parts(dims, guidance=True))


def build_flux2_klein(size: str | OfflineSize = "tiny", seed: int = 0) -> Flux2KleinPipeline:
    """A random-weight FLUX.2 [klein] pipeline: Qwen3 text encoder, no guidance embedding, step-distilled."""
    dims = _dims(size)
    torch.manual_seed(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tokenizer = _byte_tokenizer(specials, QWEN3_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=dims.text_width, intermediate_size=dims.text_width * 2,
        num_hidden_layers=QWEN3_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=dims.text_width // 4,
        max_position_embeddings=2048, tie_word_embeddings=True,
    ))
    return Flux2KleinPipeline(text_encoder=text_encoder, tokenizer=tokenizer, is_distilled=True,
                              **_flux2_parts(dims, guidance=False))


# -- full size: the real FLUX.1 architecture, random weights, made on the device --------------------------------

FULL_VARIANTS = ("schnell", "dev")  # dev has the guidance embedding; both share every other dimension


@contextmanager
def built_on(device: str):
    """Modules created inside are made directly on `device` in bf16: no fp32 copy, no host-to-device transfer
    (12B parameters initialised on a GPU take seconds; on CPU, minutes)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def full_transformer(device: str, guidance: bool) -> FluxTransformer2DModel:
    """A fresh full-size FLUX.1 transformer with random weights, on `device` in bf16."""
    with built_on(device):
        return FluxTransformer2DModel(guidance_embeds=guidance)  # diffusers' defaults are FLUX.1's dimensions


def full_pipeline(device: str, guidance: bool, seed: int = 0) -> FluxPipeline:
    """The full FLUX.1 pipeline (12B transformer, T5-XXL, CLIP-L, the 16-channel VAE), random weights, on `device`
    in bf16; the tokenizers are the offline ones (any text tokenizes, one token per character)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    transformer = full_transformer(device, guidance)
    with built_on(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768,
                                                    intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, projection_dim=768,
                                                    bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id))
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240,
                                                 num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            block_out_channels=[128, 256, 512, 512], layers_per_block=2, use_quant_conv=False,
                            use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_full_model(path: str | Path, variant: str = "dev", device: str | None = None, seed: int = 0) -> Path:
    """Write the full FLUX.1-`variant` architecture with random weights (bf16 safetensors, ~34 GB) to `path`, with
    the real preset's defaults (steps, guidance, text length): it renders at the real model's speed."""
    if variant not in FULL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(FULL_VARIANTS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(path).expanduser()
    pipe = full_pipeline(device, guidance=variant == "dev", seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    _save(pipe, folder)
    real = next(p for p in FAMILIES["flux.1"].presets if p.name == f"flux.1-{variant}")
    write_preset(folder, replace(real, name=f"offline-full-{variant}", source=str(folder)))
    return folder


def build_model(path: str | Path, size: str | OfflineSize = "tiny", seed: int = 0, family: str = "flux.1") -> Path:
    """Write a random-weight pipeline of `family` to `path` (safetensors only) with its fluxbatch preset."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    entry = FAMILIES[family]
    folder = Path(path).expanduser()
    pipe: DiffusionPipeline = entry.build(size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    _save(pipe, folder)
    dims = _dims(size)
    # FLUX.2's chat templates spend tokens on role markers, and this tokenizer spends one per character.
    text = dims.max_sequence_length * (1 if family == "flux.1" else 2)
    write_preset(folder, replace(entry.offline, name=f"offline-{size if isinstance(size, str) else 'custom'}",
                                 source=str(folder), max_sequence_length=text, width=dims.side, height=dims.side))
    return folder


def _save(pipe: DiffusionPipeline, folder: Path) -> None:
    """`save_pretrained`, safetensors only, without transformers' "Writing model shards" bars (a build prints
    one line of its own; `fluxbatch -v` leaves the libraries' output as it is)."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(folder, safe_serialization=True)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
