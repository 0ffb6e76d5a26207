"""The one thread that runs the model: decoder calls batched across requests, encoding by priority.

Every request handler and job hands its model work to a :class:`ModelWorker` and
waits on a future, so the model lives on one thread (one instance per device) and
the event loop never waits for it. The worker's loop:

1. If decode requests are pending, it takes *all* of them (up to
   ``max_decode_batch`` prompts), groups them by slice shape and point count, and
   runs each group as one decoder call. While it was busy, requests piled up; they
   leave together. An idle worker answers a lone request at once (no waiting to fill
   a batch).
2. Otherwise it runs one chunk of the most urgent encode request: a ``segment``
   (``PRIORITY_SEGMENT``) before an ``annotate`` job before a background prefetch.
   A request longer than a chunk goes back into the queue after each chunk, so a
   box on a new slice waits for at most one chunk of someone's prefetch.

:class:`WorkerModel` wraps the worker in the interface of ``PromptableModel`` so
that the engine (``SliceStack``, ``annotate``) runs unchanged on top of it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .embeddings import EmbeddingCache, SliceKey
from .errors import Cancelled
from .models.base import EMBEDDING_SHAPE, PromptableModel

log = logging.getLogger(__name__)

PRIORITY_DECODE, PRIORITY_SEGMENT, PRIORITY_ANNOTATE, PRIORITY_PREFETCH = 0, 1, 2, 3


@dataclass
class _Decode:
    embeddings: np.ndarray  # (N, 256, 64, 64)
    boxes: np.ndarray  # (N, 4) view pixels
    image_shape: tuple[int, int]  # (H, W) of the view slices
    points: Optional[np.ndarray]  # (N, P, 2) view pixels
    point_labels: Optional[np.ndarray]  # (N, P)
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> tuple:
        return (self.image_shape, None if self.points is None else self.points.shape[1])


@dataclass
class _Encode:
    images: Sequence[Callable[[], np.ndarray]]  # lazily made (H, W[, 3]) uint8 view slices
    keys: Optional[Sequence[SliceKey]]  # cache keys: cached slices are taken, new ones stored
    should_stop: Optional[Callable[[], bool]]
    on_progress: Optional[Callable[[int], None]]  # told how many more slices are ready
    keep: bool = True  # False: only fill the cache (a prefetch), the future's result is None
    out: Optional[np.ndarray] = field(init=False)
    next: int = 0
    future: Future = field(default_factory=Future)

    def __post_init__(self):
        self.out = np.empty((len(self.images), *EMBEDDING_SHAPE), dtype=np.float32) if self.keep else None


@dataclass
class WorkerStats:
    decode_calls: int = 0
    decoded_prompts: int = 0
    largest_decode_batch: int = 0
    encode_calls: int = 0
    encoded_slices: int = 0
    cache_reused_slices: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ModelWorker:
    """Owns a model and runs all its work on one thread.

    ``encode_chunk`` is how many slices one encoder step embeds (default: the model's
    ``encoder_batch``, 1 on a CPU, where a short step also keeps ``segment`` responsive).
    """

    def __init__(self, model: PromptableModel, cache: EmbeddingCache, encode_chunk: Optional[int] = None,
                 max_decode_batch: Optional[int] = None):
        self.model = model
        self.cache = cache
        self.encode_chunk = encode_chunk or model.encoder_batch
        # Requests join one decoder call until it holds this many prompts: the model's best batch
        # (4 on a CPU, 32 on a GPU), since a CPU decodes big batches slower per box.
        self.max_decode_batch = max_decode_batch or model.decoder_batch
        self._queue: list[tuple[int, int, object]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._stopping = False
        self._stats = WorkerStats()
        self._thread = threading.Thread(target=self._run, name="medsam-model-worker", daemon=True)

    # ------------------------------------------------------------ submitting

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current step; pending work fails with Cancelled."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int],
               points: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None) -> Future:
        """Future of (N, H, W) float32 probabilities; arguments as ``PromptableModel.decode``."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if points is not None:
            points = np.asarray(points, dtype=np.float64).reshape(len(boxes), -1, 2)
            point_labels = (np.ones(points.shape[:2], dtype=np.int64) if point_labels is None
                            else np.asarray(point_labels, dtype=np.int64).reshape(points.shape[:2]))
        item = _Decode(np.asarray(embeddings, dtype=np.float32), boxes, tuple(int(s) for s in image_shape),
                       points, point_labels)
        self._submit(PRIORITY_DECODE, item)
        return item.future

    def encode(self, images: Sequence[Callable[[], np.ndarray]], keys: Optional[Sequence[SliceKey]] = None,
               priority: int = PRIORITY_SEGMENT, should_stop: Optional[Callable[[], bool]] = None,
               on_progress: Optional[Callable[[int], None]] = None, keep: bool = True) -> Future:
        """Future of (N, 256, 64, 64) float32 embeddings of lazily made view slices, in order.

        With ``keys``, slices already in the cache (put there meanwhile, e.g. by a
        prefetch) are taken from it and new embeddings are stored in it; with
        ``keep=False`` (needs ``keys``) they are only stored and the result is None.
        """
        if keys is not None and len(keys) != len(images):
            raise ValueError("encode needs one cache key per image")
        if not keep and keys is None:
            raise ValueError("encode with keep=False needs cache keys, or the work is lost")
        item = _Encode(list(images), None if keys is None else list(keys), should_stop, on_progress, keep)
        if not item.images:
            item.future.set_result(item.out)
            return item.future
        self._submit(priority, item)
        return item.future

    def stats(self) -> dict:
        with self._condition:
            return {**self._stats.as_dict(), "queued": len(self._queue), "encode_chunk": self.encode_chunk}

    def _submit(self, priority: int, item) -> None:
        with self._condition:
            if self._stopping:
                item.future.set_exception(Cancelled("the server is shutting down"))
                return
            heapq.heappush(self._queue, (priority, next(self._order), item))
            self._condition.notify()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    pending, self._queue = self._queue, []
                    break
                if self._queue[0][0] == PRIORITY_DECODE:
                    batch, prompts = [], 0
                    while self._queue and self._queue[0][0] == PRIORITY_DECODE and prompts < self.max_decode_batch:
                        item = heapq.heappop(self._queue)[2]
                        batch.append(item)
                        prompts += len(item.boxes)
                    entry = None
                else:
                    batch, entry = [], heapq.heappop(self._queue)
            try:
                if batch:
                    self._decode(batch)
                else:
                    self._encode_step(*entry)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any one request
                log.exception("model worker step failed")
                for item in batch or [entry[2]]:
                    if not item.future.done():
                        item.future.set_exception(err)
        for _, _, item in pending:
            if not item.future.done():
                item.future.set_exception(Cancelled("the server is shutting down"))

    def _decode(self, items: list[_Decode]) -> None:
        groups: dict[tuple, list[_Decode]] = {}
        for item in items:
            groups.setdefault(item.group, []).append(item)
        for group in groups.values():
            try:
                probabilities = self.model.decode(_joined(group, "embeddings"), _joined(group, "boxes"),
                                                  group[0].image_shape, _joined(group, "points"),
                                                  _joined(group, "point_labels"))
            except Exception as err:  # noqa: BLE001 - one bad request must not fail its batch mates: retry one by one
                if len(group) == 1:
                    group[0].future.set_exception(err)
                else:
                    for item in group:
                        self._decode([item])
                continue
            start = 0
            for item in group:
                item.future.set_result(probabilities[start:start + len(item.boxes)])
                start += len(item.boxes)
            with self._condition:
                self._stats.decode_calls += 1
                self._stats.decoded_prompts += len(probabilities)
                self._stats.largest_decode_batch = max(self._stats.largest_decode_batch, len(probabilities))

    def _encode_step(self, priority: int, order: int, item: _Encode) -> None:
        if item.future.done():
            return
        if item.should_stop is not None and item.should_stop():
            item.future.set_exception(Cancelled("cancelled while computing embeddings"))
            return
        chunk, reused, start = [], 0, item.next
        while item.next < len(item.images) and len(chunk) < self.encode_chunk:
            index = item.next
            item.next += 1
            if item.keys is not None and item.keys[index] in self.cache:
                cached = self.cache.get(item.keys[index]) if item.keep else True
                if cached is not None:  # (evicted in between: encode it after all)
                    if item.keep:
                        item.out[index] = cached
                    reused += 1
                    continue
            chunk.append(index)
        if chunk:
            embedded = self.model.embed([item.images[i]() for i in chunk])
            for index, embedding in zip(chunk, embedded, strict=True):
                if item.keep:
                    item.out[index] = embedding
                if item.keys is not None:
                    self.cache.put(item.keys[index], embedding)
        with self._condition:
            self._stats.encode_calls += bool(chunk)
            self._stats.encoded_slices += len(chunk)
            self._stats.cache_reused_slices += reused
        if item.on_progress is not None:
            item.on_progress(item.next - start)
        if item.next < len(item.images):
            with self._condition:  # back in line at its old place: FIFO within a priority
                heapq.heappush(self._queue, (priority, order, item))
        else:
            item.future.set_result(item.out)


def _joined(group: list[_Decode], name: str) -> Optional[np.ndarray]:
    """One field of a group's requests as one array; a request alone keeps its own (no 4 MiB copy per slice)."""
    parts = [getattr(item, name) for item in group]
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class WorkerModel:
    """The ``PromptableModel`` interface over a :class:`ModelWorker`, for the engine to run on.

    ``embed`` hands all its slices over at once (the worker chunks them) at
    ``priority``; ``should_stop`` is checked before each chunk and ``on_progress``
    told of each finished one.
    """

    encoder_batch = 1 << 16  # embed_slices passes every miss in one call; the worker does the chunking

    def __init__(self, worker: ModelWorker, priority: int = PRIORITY_SEGMENT,
                 should_stop: Optional[Callable[[], bool]] = None, on_progress: Optional[Callable[[int], None]] = None):
        self.worker = worker
        self.name = worker.model.name
        self.recipe = worker.model.recipe
        self.priority = priority
        self.should_stop = should_stop
        self.on_progress = on_progress

    @property
    def device(self) -> str:
        return self.worker.model.device

    @property
    def decoder_batch(self) -> int:
        return self.worker.model.decoder_batch

    def embed(self, slices: Sequence[np.ndarray]) -> np.ndarray:
        """List of (H, W) or (H, W, 3) uint8 view slices -> (N, 256, 64, 64) float32."""
        images = [(lambda s=s: s) for s in slices]
        return self.worker.encode(images, None, self.priority, self.should_stop, self.on_progress).result()

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int],
               points: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None) -> np.ndarray:
        """As ``PromptableModel.decode``: (N, H, W) float32 probabilities, batched with other requests."""
        return self.worker.decode(embeddings, boxes, image_shape, points, point_labels).result()
