"""The job's scorers (schemas/quality.py), loaded once per actor and run on each image right after it is rendered.

`clip_score` is torchmetrics' CLIP score: 100 x max(cosine(image embedding, text embedding), 0), with the prompt
truncated to CLIP's 77 tokens. `aesthetic_score` is the LAION "improved aesthetic predictor": linear layers (no
activations) on the L2-normalised CLIP image embedding, read from a folder's `model.safetensors` whose tensors are
named `layers.<i>.weight` / `layers.<i>.bias` as in LAION's checkpoint (docs/quality.md converts it).

Each image is scored alone, in fp32, on the renderer's device: a score never depends on the image's batch-mates,
and the same image always scores the same (tests/test_quality.py). A CLIP model is named as the main model is: a
preset (CLIP_PRESETS), a hub id, a local folder, or a storage URL fetched once per node into the model cache.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from flux_worker.model_cache import fetch_model
from schemas import RenderOptions
from schemas.quality import AESTHETIC_SCORE, AESTHETIC_WEIGHTS, CLIP_PRESETS, CLIP_SCORE, QualitySpec, scorer_kind

TEXT_CACHE = 4096  # prompts whose CLIP text embedding an actor keeps (a synthesis job repeats its templates)


def scorer_source(name: str, options: RenderOptions | None, cache_dir: str | None = None) -> str:
    """Where `from_pretrained` reads a scorer named `name`: a preset's hub id, the node's copy of a URL, or itself."""
    kind = scorer_kind(name)
    if kind == "preset":
        return CLIP_PRESETS[name]
    if kind == "url":
        folder, _ = fetch_model(name, options.model_storage_options if options else {}, cache_dir)
        return str(folder)
    return str(Path(name).expanduser()) if kind == "folder" else name


def aesthetic_layers(state: dict[str, torch.Tensor]) -> list[torch.nn.Linear]:
    """The predictor's linear layers in order, from `layers.<i>.weight`/`.bias` (LAION's names; dropouts hold none)."""
    indices = sorted({int(name.split(".")[1]) for name in state if name.startswith("layers.")})
    if not indices:
        raise ValueError(f"no layers.<i>.weight tensors in {AESTHETIC_WEIGHTS} (names: {', '.join(list(state)[:4])})")
    layers = []
    for index in indices:
        weight, bias = state[f"layers.{index}.weight"], state.get(f"layers.{index}.bias")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        layer.weight.data.copy_(weight)
        if bias is not None:
            layer.bias.data.copy_(bias)
        layers.append(layer)
    if layers[-1].out_features != 1:
        raise ValueError(f"the last layer gives {layers[-1].out_features} values; an aesthetic score is one")
    return layers


class Scorers:
    """The scores a job asks for, computed on one device; `score(image, prompt)` -> {score name: value}."""

    def __init__(self, quality: QualitySpec, device: str, options: RenderOptions | None = None,
                 cache_dir: str | None = None):
        from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

        self.device = device
        self.names = quality.scores
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        hub = {"token": options.hub_token} if options and options.hub_token else {}
        source = scorer_source(quality.clip, options, cache_dir)
        self.clip = CLIPModel.from_pretrained(source, dtype=torch.float32, use_safetensors=True, **hub).to(device)
        self.clip.eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(source, **hub)
        self.processor = CLIPImageProcessorPil.from_pretrained(source, **hub)  # no torchvision needed
        self.aesthetic = None
        if quality.aesthetic:
            folder = Path(scorer_source(quality.aesthetic, options, cache_dir))
            state = load_file(str(folder / AESTHETIC_WEIGHTS if folder.is_dir() else folder))
            self.aesthetic = torch.nn.Sequential(*aesthetic_layers(state)).to(device).eval()
            width = self.aesthetic[0].in_features
            if width != self.clip.config.projection_dim:
                raise ValueError(f"quality.aesthetic takes {width}-value embeddings and quality.clip makes "
                                 f"{self.clip.config.projection_dim}: pair the predictor with its CLIP model")

    def score(self, image: Any, prompt: str) -> dict[str, float]:
        """Every score of one image (a PIL image, as decoded) and its prompt."""
        with torch.inference_mode():
            pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
            embedding = self.clip.get_image_features(pixel_values=pixels.to(self.device)).pooler_output[0]
            embedding = embedding / embedding.norm()
            text = self._text(prompt)
            scores = {CLIP_SCORE: float(100 * torch.clamp(embedding @ text, min=0))}
            if self.aesthetic is not None:
                scores[AESTHETIC_SCORE] = float(self.aesthetic(embedding[None])[0, 0])
        return scores

    def _text(self, prompt: str) -> torch.Tensor:
        """The prompt's normalised CLIP text embedding, cached: a prompt's candidates and variants share it."""
        found = self._texts.get(prompt)
        if found is None:
            tokens = self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length,
                                    return_tensors="pt")
            found = self.clip.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()}).pooler_output[0]
            found = found / found.norm()
            self._texts[prompt] = found
            if len(self._texts) > TEXT_CACHE:
                self._texts.popitem(last=False)
        else:
            self._texts.move_to_end(prompt)
        return found
