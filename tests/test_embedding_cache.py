"""A prompt is encoded once per actor and sequence length; cached encodings render the same bytes."""

from __future__ import annotations

import torch

from flux_worker.embedding_cache import EmbeddingCache
from flux_worker.renderer import Renderer
from schemas import RenderOptions
from tests.test_render_overlap import plan_batch, tiny_pipeline  # noqa: F401 - the fixture is shared


def encoding(floats: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(floats - 4), torch.zeros(4)  # float32: 4 bytes per element


def test_a_cached_prompt_is_a_hit_and_another_sequence_length_is_a_miss():
    cache = EmbeddingCache(max_bytes=10_000)
    cache.put("a cat", 64, encoding(100))

    assert cache.get("a cat", 64) is not None
    assert cache.get("a cat", 128) is None
    assert cache.get("a dog", 64) is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_the_cache_drops_the_least_recently_used_encoding_past_its_byte_bound():
    cache = EmbeddingCache(max_bytes=1000)  # room for two encodings of 400 bytes
    cache.put("first", 64, encoding(100))
    cache.put("second", 64, encoding(100))
    cache.get("first", 64)  # now "second" is the least recently used
    cache.put("third", 64, encoding(100))

    assert [p for p in ("first", "second", "third") if cache.get(p, 64) is not None] == ["first", "third"]
    assert len(cache) == 2


def test_an_encoding_larger_than_the_whole_cache_is_not_kept():
    cache = EmbeddingCache(max_bytes=100)
    cache.put("huge", 64, encoding(1000))

    assert len(cache) == 0 and cache.get("huge", 64) is None


def test_images_rendered_from_cached_encodings_equal_uncached_ones(tmp_path, tiny_model, tiny_pipeline):  # noqa: F811
    batch = plan_batch(6, prompts=["a red fox", "a grey heron"])  # three images per prompt
    model = {"name": str(tiny_model)}
    cached = Renderer(model, RenderOptions(output_uri=str(tmp_path / "cached")), pipeline=tiny_pipeline)
    uncached = Renderer(model, RenderOptions(output_uri=str(tmp_path / "uncached"), embedding_cache_bytes=0),
                        pipeline=tiny_pipeline)

    with_cache = cached(batch).column("sha256").to_pylist()
    without = uncached(batch).column("sha256").to_pylist()

    assert (cached.cache.misses, cached.cache.hits) == (2, 4)
    assert len(uncached.cache) == 0
    assert with_cache == without and None not in with_cache
