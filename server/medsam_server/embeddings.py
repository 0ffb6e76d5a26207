"""The per-slice embedding cache and the one function that fills it.

An embedding is the image encoder's output for one slice: (256, 64, 64) float32,
4 MiB (2 MiB stored as fp16). It is keyed by everything that changes it:

    SliceKey(volume digest, axis, slice index, model name, preprocessing)

where *preprocessing* names the intensity mapping and the in-plane view, so a new
window or orientation never reuses a stale embedding.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from .errors import Cancelled
from .models.base import EMBEDDING_SHAPE, PromptableModel

DEFAULT_BUDGET_BYTES = 2 << 30  # 2 GiB: 512 slices in fp32, 1024 in fp16


class SliceKey(NamedTuple):
    volume: str
    axis: int
    index: int
    model: str
    preprocessing: str


def volume_digest(volume: np.ndarray) -> str:
    """Content digest of an array (dtype, shape and bytes): a re-upload of the same volume matches."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{volume.dtype.str}{volume.shape}".encode())
    digest.update(np.ascontiguousarray(volume).data)
    return digest.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    budget_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class EmbeddingCache:
    """Thread-safe LRU of slice embeddings under a byte budget.

    ``fp16=True`` halves the memory per slice; embeddings come back as float32 either
    way (the decoder's probabilities move by < 1e-3, see the tests).
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, fp16: bool = False):
        if budget_bytes < 0:
            raise ValueError("the cache budget cannot be negative")
        self.budget_bytes = int(budget_bytes)
        self.dtype = np.float16 if fp16 else np.float32
        self._entries: OrderedDict[SliceKey, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = CacheStats(budget_bytes=self.budget_bytes)

    def get(self, key: SliceKey) -> Optional[np.ndarray]:
        """The (256, 64, 64) float32 embedding, or None; counts a hit or a miss."""
        with self._lock:
            stored = self._entries.get(key)
            if stored is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
        return stored.astype(np.float32)

    def __contains__(self, key: SliceKey) -> bool:
        with self._lock:
            return key in self._entries

    def put(self, key: SliceKey, embedding: np.ndarray) -> None:
        stored = np.ascontiguousarray(embedding, dtype=self.dtype)
        if stored.nbytes > self.budget_bytes:
            return  # a zero or tiny budget disables caching rather than thrashing
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._stats.bytes -= old.nbytes
            self._entries[key] = stored
            self._stats.bytes += stored.nbytes
            while self._stats.bytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._stats.bytes -= evicted.nbytes
                self._stats.evictions += 1

    def drop_volume(self, volume: str) -> None:
        """Forget every slice of one volume (a deleted session's volume)."""
        with self._lock:
            for key in [k for k in self._entries if k.volume == volume]:
                self._stats.bytes -= self._entries.pop(key).nbytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**{**self._stats.__dict__, "entries": len(self._entries)})


def embed_slices(
    model: PromptableModel,
    cache: EmbeddingCache,
    keys: Sequence[SliceKey],
    view_slice: Callable[[int], np.ndarray],
    progress: Optional[Callable[[int], None]] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> tuple[np.ndarray, int]:
    """Embeddings for ``keys`` in order, computing only the cached misses.

    ``view_slice(i)`` returns the uint8 view-pixel image of ``keys[i]``; it is called
    only for misses. ``progress(n)`` is told each newly finished slice count;
    ``should_stop()`` is polled between encoder batches (cancel).
    Returns (N, 256, 64, 64) float32 and the number of cache hits.
    """
    out = np.empty((len(keys), *EMBEDDING_SHAPE), dtype=np.float32)
    missing: list[int] = []
    for i, key in enumerate(keys):
        cached = cache.get(key)
        if cached is None:
            missing.append(i)
        else:
            out[i] = cached
    hits = len(keys) - len(missing)
    if progress and hits:
        progress(hits)
    for batch in _chunks(missing, model.encoder_batch):
        if should_stop and should_stop():
            raise Cancelled("cancelled while computing embeddings")
        embedded = model.embed([view_slice(i) for i in batch])
        for i, embedding in zip(batch, embedded):
            out[i] = embedding
            cache.put(keys[i], embedding)
        if progress:
            progress(len(batch))
    return out, hits


def _chunks(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]
