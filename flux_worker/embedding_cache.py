"""A bounded cache of prompt encodings, so a prompt rendered many times is encoded once per actor.

Keyed by (prompt, max sequence length); one cache belongs to one loaded pipeline, so the encoder is
fixed. Bounded by bytes, not entries: one Flux.1 T5 encoding at 512 tokens is 4 MiB in bf16, one FLUX.2 [dev]
encoding (three Mistral layers stacked, 15360 wide) 15 MiB.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# The family's encoding of one prompt (flux_worker/families.py): pipeline keyword -> tensor.
Encoding = dict[str, torch.Tensor] | tuple[torch.Tensor, ...]


def _size(encoding: Encoding) -> int:
    tensors = encoding.values() if isinstance(encoding, dict) else encoding
    return sum(t.numel() * t.element_size() for t in tensors)


class EmbeddingCache:
    """Least-recently-used prompt encodings, at most `max_bytes` of tensors."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int], Encoding] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str, max_sequence_length: int) -> Encoding | None:
        key = (prompt, max_sequence_length)
        found = self._items.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return found

    def put(self, prompt: str, max_sequence_length: int, encoding: Encoding) -> None:
        size = _size(encoding)
        if size > self.max_bytes:
            return
        key = (prompt, max_sequence_length)
        if key in self._items:
            return
        self._items[key] = encoding
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= _size(old)

    def __len__(self) -> int:
        return len(self._items)
