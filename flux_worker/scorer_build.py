"""Random-weight scorers built offline (`fluxbatch model build PATH --scorer clip|aesthetic`), for tests, the demo
and CPU benchmarks: a CLIP model in the transformers folder format and a LAION-shaped aesthetic predictor.

A size's predictor takes the embeddings of the same size's CLIP model: `tiny` (32 values, milliseconds per image),
`bench` (64) and `full` (768: openai/clip-vit-large-patch14's configuration, which the LAION predictor was trained
on, so its cost per image is the real model's).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

from flux_worker.model_build import _clip_tokenizer
from flux_worker.scorer_memory import AESTHETIC_WIDTHS
from schemas.quality import AESTHETIC_WEIGHTS

# vision (hidden, layers, heads, image side, patch), text (hidden, layers, heads), projection
CLIP_SIZES = {
    "tiny": ((32, 2, 2, 32, 8), (32, 2, 2), 32),
    "bench": ((64, 2, 4, 64, 16), (64, 2, 4), 64),
    "full": ((1024, 24, 16, 224, 14), (768, 12, 12), 768),
}
AESTHETIC_INDICES = (0, 2, 4, 6, 7)  # its checkpoint's layer names: layers.0, layers.2 ...
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
SCORERS = ("clip", "aesthetic")


def build_clip(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random-weight CLIP model, tokenizer and image processor at `path`, loadable by `CLIPModel.from_pretrained`."""
    (vision_width, vision_layers, vision_heads, side, patch), (text_width, text_layers, text_heads), projection = \
        CLIP_SIZES[size]
    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config={"hidden_size": text_width, "num_hidden_layers": text_layers, "num_attention_heads": text_heads,
                     "intermediate_size": 4 * text_width, "vocab_size": len(tokenizer),
                     "max_position_embeddings": tokenizer.model_max_length,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": vision_width, "num_hidden_layers": vision_layers,
                       "num_attention_heads": vision_heads, "intermediate_size": 4 * vision_width,
                       "image_size": side, "patch_size": patch},
        projection_dim=projection,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=OPENAI_MEAN, image_std=OPENAI_STD).save_pretrained(folder)
    return folder


def build_aesthetic(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random-weight aesthetic predictor for `size`'s CLIP embeddings: `path/model.safetensors`, LAION's names."""
    torch.manual_seed(seed)
    widths = (CLIP_SIZES[size][2], *AESTHETIC_WIDTHS)
    state = {}
    for index, (inputs, outputs) in zip(AESTHETIC_INDICES, zip(widths, widths[1:])):
        layer = torch.nn.Linear(inputs, outputs)
        state[f"layers.{index}.weight"] = layer.weight.detach().contiguous()
        state[f"layers.{index}.bias"] = layer.bias.detach().contiguous()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / AESTHETIC_WEIGHTS))
    return folder


def build_scorer(path: str | Path, scorer: str, size: str = "tiny", seed: int = 0) -> Path:
    """`fluxbatch model build --scorer`: the named scorer at `path`."""
    return {"clip": build_clip, "aesthetic": build_aesthetic}[scorer](path, size, seed)
