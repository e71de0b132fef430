"""Build a random-weight Flux pipeline offline, in the diffusers folder format.

No hub: the tokenizers are made from a small character vocabulary, the encoders, transformer and
VAE from configs. `tiny` renders in milliseconds for tests; `bench` takes a fraction of a second per
image on two CPU cores, which makes fluxbatch's own overhead measurable against the model's time.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from flux_worker.presets import ModelPreset, write_preset


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


def build_model(path: str | Path, size: str | OfflineSize = "tiny", seed: int = 0) -> Path:
    """Write a random-weight pipeline to `path` (safetensors only) with its fluxbatch preset."""
    folder = Path(path).expanduser()
    pipe = build_pipeline(size, seed)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    dims = _dims(size)
    write_preset(
        folder,
        ModelPreset(
            name=f"offline-{size if isinstance(size, str) else 'custom'}",
            source=str(folder),
            steps=4,
            guidance=3.5,
            max_sequence_length=dims.max_sequence_length,
            width=dims.side,
            height=dims.side,
            min_side=64,
            max_side=1024,
        ),
    )
    return folder
