"""The decoder's slice-only tensors of the slices decoded last, kept for the next prompt on them.

The decoder runs in two steps (``torch_runtime.PromptedMaskDecoder``): ``prepare`` (the image
tokens and layer 0's image-side key, value and query: about a fifth of the work, the same for
every prompt on a slice) and ``decode_prepared`` (the rest). A user drawing boxes on one slice
hits the same slice again and again, so :class:`PreparedSlices` keeps the first step's output
(about 10 MiB a slice) of a few slices in a small LRU under a byte budget, apart from the
embedding cache (which holds every slice of a volume, at 4 MiB each).

Entries are keyed like the embedding cache (``embeddings.SliceKey``: the volume as cached for its
owner, axis, slice, model, intensity mapping and view), and each is checked against a sample of
the embedding it was made from: a slice never gets another's tensors, nor tensors of an earlier
embedding of itself (a fresh encoder output, then its fp16 copy from the cache). Decoding without
keys (whole-volume annotate) runs the one-graph decoder and keeps nothing here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, Optional, Sequence

import numpy as np

#: Default byte budget: six LiteMedSAM slices.
DEFAULT_BUDGET_BYTES = 64 << 20
#: Every SAMPLE_STRIDE-th value of an embedding is compared before its entry is used (a prime: the samples
#: fall on every channel and on different pixels of each).
SAMPLE_STRIDE = 4099


class PreparedSlices:
    """Thread-safe LRU: slice key -> (the embedding's sample, ``prepare``'s tensors of that one slice)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[Hashable, tuple[np.ndarray, tuple[np.ndarray, ...], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self._bytes = 0

    def get(self, key: Hashable, embedding: np.ndarray) -> Optional[tuple[np.ndarray, ...]]:
        """The tensors made from ``embedding`` (256, 64, 64) of slice ``key``, or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and np.array_equal(entry[0], _sample(embedding)):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
            self.misses += 1
            return None

    def put(self, key: Hashable, embedding: np.ndarray, tensors: tuple[np.ndarray, ...]) -> None:
        """Keep one slice's tensors (each (1, ...)); the least recently used go while over the budget."""
        size = sum(t.nbytes for t in tensors)
        if size > self.budget_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._bytes += size - (old[2] if old else 0)
            self._entries[key] = (_sample(embedding), tensors, size)
            while self._bytes > self.budget_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][2]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries), "bytes": self._bytes,
                    "budget_bytes": self.budget_bytes}

    def tensors(self, runtime: Any, keys: Sequence[Hashable], embeddings: np.ndarray) -> tuple[np.ndarray, ...]:
        """``prepare``'s tensors of the N slices ``keys`` (embeddings (N, 256, 64, 64)), stacked: kept ones reused,
        the others made by ``runtime.prepare`` one slice at a time (a slice given twice is made once) and kept."""
        if len(keys) != len(embeddings):
            raise ValueError(f"{len(keys)} slice keys for {len(embeddings)} embeddings")
        rows: dict[Hashable, tuple[np.ndarray, ...]] = {}
        for key, embedding in zip(keys, embeddings, strict=True):
            if key not in rows:
                found = self.get(key, embedding)
                if found is None:
                    found = runtime.prepare(embedding[None])
                    self.put(key, embedding, found)
                rows[key] = found
        if len(keys) == 1:
            return rows[keys[0]]
        return tuple(np.concatenate(parts) for parts in zip(*(rows[key] for key in keys), strict=True))


def _sample(embedding: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(embedding).reshape(-1)[::SAMPLE_STRIDE])
