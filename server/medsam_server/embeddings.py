"""The per-slice embedding cache and THE embed path: from the cache, or encoded and cached.

An embedding is the image encoder's output for one slice (``model.embedding_shape``,
(256, 64, 64) float32 for both families: 4 MiB, 2 MiB stored as fp16). It is keyed by
everything that changes it:

    SliceKey(volume digest, axis, slice index, model name, preprocessing)

where *preprocessing* names the intensity mapping and the in-plane view, so a new
window or orientation never reuses a stale embedding.

:func:`embed_steps` is the only code that looks embeddings up and encodes the misses.
It is a generator that stops after each encoder batch: :func:`embed` runs it to the
end at once (the CLI and the engine), and the server's model worker runs one step at
a time between more urgent work, so one algorithm serves both.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generator, NamedTuple, Optional, Sequence

import numpy as np

from .errors import Cancelled

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


ViewSlice = Callable[[int], np.ndarray]  # n -> the uint8 view-pixel image of keys[n]
Progress = Callable[[int], None]  # told how many more slices are ready
ShouldStop = Callable[[], bool]
EmbedResult = tuple[Optional[np.ndarray], int]  # (N, *embedding_shape) float32 or None, cache hits


def embed_steps(model: Any, cache: EmbeddingCache, keys: Sequence[SliceKey], view_slice: ViewSlice,
                progress: Optional[Progress] = None, should_stop: Optional[ShouldStop] = None,
                keep: bool = True, chunk: Optional[int] = None) -> Generator[None, None, EmbedResult]:
    """Embeddings for ``keys`` in order, encoding only what the cache lacks; yields after each encoder batch.

    ``model`` has ``embed(list of uint8 view slices)``, ``embedding_shape`` and ``encoder_batch``;
    ``view_slice(n)`` is called only for misses; ``progress(n)`` hears of each finished batch (hits
    first); ``should_stop()`` is polled before each batch (Cancelled). The cache is asked again
    before each batch, so a slice that another run stored meanwhile is not encoded twice.
    ``keep=False`` only fills the cache (a long prefetch must not hold every embedding twice) and
    returns None for the array. ``chunk`` is slices per step (default: the model's encoder batch).
    Returns the (N, *embedding_shape) float32 array (or None) and the number of cache hits.
    """
    out = np.empty((len(keys), *model.embedding_shape), dtype=np.float32) if keep else None
    missing = [n for n, key in enumerate(keys) if not _take(cache, key, out, n)]
    hits = len(keys) - len(missing)
    if progress and hits:
        progress(hits)
    step = max(1, chunk or model.encoder_batch)
    position = 0
    while position < len(missing):
        if should_stop and should_stop():
            raise Cancelled("cancelled while computing embeddings")
        batch: list[int] = []
        start = position
        while position < len(missing) and len(batch) < step:
            n = missing[position]
            position += 1
            if keys[n] in cache and _take(cache, keys[n], out, n):  # stored meanwhile (a prefetch, a request)
                hits += 1
            else:
                batch.append(n)
        if batch:
            for n, embedding in zip(batch, model.embed([view_slice(n) for n in batch]), strict=True):
                if out is not None:
                    out[n] = embedding
                cache.put(keys[n], embedding)
        if progress:
            progress(position - start)
        yield
    return out, hits


def _take(cache: EmbeddingCache, key: SliceKey, out: Optional[np.ndarray], n: int) -> bool:
    """Copy a cached embedding into ``out[n]``; True when the cache had it."""
    if out is None:
        return key in cache
    cached = cache.get(key)
    if cached is None:
        return False
    out[n] = cached
    return True


def embed(model: Any, cache: EmbeddingCache, keys: Sequence[SliceKey], view_slice: ViewSlice,
          progress: Optional[Progress] = None, should_stop: Optional[ShouldStop] = None,
          keep: bool = True) -> EmbedResult:
    """:func:`embed_steps` run to the end here and now."""
    steps = embed_steps(model, cache, keys, view_slice, progress, should_stop, keep)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
