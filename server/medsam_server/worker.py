"""The model's two threads: decoder calls batched across requests, encoding by priority and turns.

Every request handler and job hands its model work to a :class:`ModelWorker` and
waits on a future, so the model (one instance per device) is used by two threads
only, and the event loop never waits for it. One thread decodes, the other encodes:
the decoder is small, so a box on a cached slice never waits for an encoder step
(seconds on a CPU) of someone else's work.

1. Decoding: when decode requests are pending, it takes *all* of them (up to
   ``max_decode_batch`` prompts), groups them by slice shape and point count, and
   runs each group as one decoder call. While it was busy, requests piled up; they
   leave together. An idle worker answers a lone request at once (no waiting to fill
   a batch). A call holds at most ``max_decode_batch`` prompts, and a request of more
   is queued in parts of that size, so that another user's box waits for one part,
   not for a 500-box request (or an annotate job's batch) whole.
2. Encoding: it runs one step of the most urgent embedding request: a ``segment``
   (``PRIORITY_SEGMENT``) before an ``annotate`` job before a background prefetch.
   A request is ``embeddings.embed_steps`` (the one embed path), one encoder chunk
   a step; it goes back into the queue after each, so a box on a new slice waits for
   at most one chunk of someone's prefetch.

Within a priority, callers (``owner``: a token) take turns, one step each (round
robin), so one user's long job or flood of requests cannot make another's wait for
all of it; a segment request may hold at most ``max_waiting_slices`` slices waiting
per owner (Busy beyond). Work whose future was cancelled (its client went away) is
dropped before its next step.

:class:`WorkerModel` wraps the worker in the interface of ``PromptableModel`` that
the engine (``SliceStack``, ``annotate``) uses, so the engine runs unchanged on it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .embeddings import EmbeddingCache, EmbedResult, SliceKey, ViewSlice, embed_steps
from .errors import Busy, Cancelled
from .futures import gathered, settle

log = logging.getLogger(__name__)

PRIORITY_DECODE, PRIORITY_SEGMENT, PRIORITY_ANNOTATE, PRIORITY_PREFETCH = 0, 1, 2, 3
PRIORITIES = (PRIORITY_DECODE, PRIORITY_SEGMENT, PRIORITY_ANNOTATE, PRIORITY_PREFETCH)
#: Slices one owner's segment requests may have waiting for the encoder at once.
MAX_WAITING_SLICES = 64
#: How much nicer than the process the encoder thread runs (Linux): a decode (a box on a cached slice) goes first
#: on a busy CPU. Added to the process's own nice value, never set outright: Ray starts its workers at nice 15,
#: where an absolute 10 would put the encoder *above* the decoder and Serve's proxy and ingress.
ENCODER_NICE = 10
MAX_NICE = 19


@dataclass
class _Decode:
    embeddings: np.ndarray  # (N, 256, 64, 64)
    boxes: np.ndarray  # (N, 4) view pixels
    image_shape: tuple[int, int]  # (H, W) of the view slices
    points: Optional[np.ndarray]  # (N, P, 2) view pixels
    point_labels: Optional[np.ndarray]  # (N, P)
    future: Future = field(default_factory=Future)
    alternatives: bool = False  # the decoder's other mask outputs (N, 3, H, W), not the model's mask
    keys: Optional[list] = None  # the slices' SliceKeys: their decoder step kept for the next prompt

    @property
    def group(self) -> tuple:
        return (self.image_shape, None if self.points is None else self.points.shape[1], self.alternatives,
                self.keys is None)


@dataclass
class _Embed:
    steps: Generator[None, None, EmbedResult]
    future: Future = field(default_factory=Future)
    owner: str = ""
    waiting: int = 0  # slices counted against the owner's MAX_WAITING_SLICES


#: What ``/info`` reports of the worker; all counts since it started.
STATS = ("decode_calls", "decoded_prompts", "largest_decode_batch", "encode_calls", "encoded_slices",
         "cache_reused_slices")  # the last: slices an embedding request found cached instead of encoding them


class _CountingModel:
    """The worker's model as ``embed_steps`` sees it: encoder calls counted, chunked as the worker says."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self.embedding_shape = worker.model.embedding_shape
        self.encoder_batch = worker.encode_chunk

    def embed(self, slices: Sequence[np.ndarray]) -> np.ndarray:
        out = self.worker.model.embed(slices)
        with self.worker._condition:
            self.worker._stats["encode_calls"] += 1
            self.worker._stats["encoded_slices"] += len(slices)
        return out


class ModelWorker:
    """Owns a model and runs all its work on one thread.

    ``encode_chunk`` is how many slices one encoder step embeds (default: the model's
    ``encoder_batch``, 1 on a CPU, where a short step also keeps ``segment`` responsive).
    """

    def __init__(self, model: Any, cache: EmbeddingCache, encode_chunk: Optional[int] = None,
                 max_decode_batch: Optional[int] = None):
        self.model = model
        self.cache = cache
        self.encode_chunk = encode_chunk or model.encoder_batch
        # Requests join one decoder call until it holds this many prompts: the model's best batch
        # (4 on a CPU, 32 on a GPU), since a CPU decodes big batches slower per box.
        self.max_decode_batch = max_decode_batch or model.decoder_batch
        # priority -> owner -> that owner's requests in arrival order; owners take turns (the first goes next)
        self._queues: dict[int, OrderedDict[str, deque]] = {p: OrderedDict() for p in PRIORITIES}
        self._waiting: dict[str, int] = {}  # owner -> slices its segment requests have queued
        self.max_waiting_slices = MAX_WAITING_SLICES
        self._condition = threading.Condition()
        self._stopping = False
        self._stats = dict.fromkeys(STATS, 0)
        self._encoder = _CountingModel(self)
        self._threads = [threading.Thread(target=self._run, args=(decoding,), daemon=True,
                                          name=f"medsam-model-{'decode' if decoding else 'encode'}")
                         for decoding in (True, False)]

    # ------------------------------------------------------------ submitting

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop after the current step; pending work fails with Cancelled."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=60)

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int],
               points: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
               owner: str = "", alternatives: bool = False, keys: Optional[Sequence[SliceKey]] = None) -> Future:
        """Future of (N, H, W) float32 probabilities; arguments as ``PromptableModel.decode`` (``alternatives``:
        of ``PromptableModel.decode_alternatives``, (N, 3, H, W), boxes only)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if points is not None:
            points = np.asarray(points, dtype=np.float64).reshape(len(boxes), -1, 2)
            point_labels = (np.ones(points.shape[:2], dtype=np.int64) if point_labels is None
                            else np.asarray(point_labels, dtype=np.int64).reshape(points.shape[:2]))
        embeddings, step = np.asarray(embeddings, dtype=np.float32), self.max_decode_batch
        cut = lambda a, n: None if a is None else a[n:n + step]  # noqa: E731 - parts of one batch each
        keys = None if keys is None or alternatives else list(keys)
        parts = [_Decode(cut(embeddings, n), cut(boxes, n), tuple(int(s) for s in image_shape), cut(points, n),
                         cut(point_labels, n), alternatives=alternatives, keys=cut(keys, n))
                 for n in range(0, len(boxes), step)]
        for part in parts:
            self._submit(PRIORITY_DECODE, part, owner)
        return parts[0].future if len(parts) == 1 else gathered([part.future for part in parts])

    def embed(self, keys: Sequence[SliceKey], view_slice: ViewSlice, priority: int = PRIORITY_SEGMENT,
              progress: Optional[Callable[[int], None]] = None, should_stop: Optional[Callable[[], bool]] = None,
              keep: bool = True, owner: str = "") -> Future:
        """Future of ``embeddings.embed_steps``' result for ``keys``, run here a chunk at a time at ``priority``.

        Cancel the future to drop the work. At ``PRIORITY_SEGMENT`` the owner's waiting slices are
        limited: Busy when this request would take them past ``max_waiting_slices``.
        """
        item = _Embed(embed_steps(self._encoder, self.cache, keys, view_slice, progress, should_stop, keep),
                      owner=owner)
        if priority == PRIORITY_SEGMENT:
            with self._condition:
                waiting = self._waiting.get(owner, 0)
                if waiting + len(keys) > self.max_waiting_slices:
                    raise Busy(f"{waiting} slices of yours already wait for the encoder and the limit is "
                               f"{self.max_waiting_slices}: wait for their answers (or cancel the requests you gave "
                               "up on) before asking for more")
                self._waiting[owner] = waiting + len(keys)
                item.waiting = len(keys)
        self._submit(priority, item, owner)
        return item.future

    def stats(self) -> dict:
        with self._condition:
            return {**self._stats, "queued": self._queued(), "encode_chunk": self.encode_chunk}

    def _queued(self) -> int:
        return sum(len(queue) for owners in self._queues.values() for queue in owners.values())

    def _submit(self, priority: int, item, owner: str) -> None:
        with self._condition:
            if self._stopping:
                self._release(item)
                item.future.set_exception(Cancelled("the server is shutting down"))
                return
            self._queues[priority].setdefault(owner, deque()).append(item)
            self._condition.notify_all()  # two threads wait: the one for this kind of work must wake
        item.future.add_done_callback(lambda future: self._forget(item, priority, owner))

    def _forget(self, item, priority: int, owner: str) -> None:
        """A request's future is settled: if it was cancelled (its client went away), out of the queue now."""
        with self._condition:
            self._release(item)
            queue = self._queues[priority].get(owner, ())
            place = next((n for n, queued in enumerate(queue) if queued is item), None)  # `is`: items hold arrays
            if item.future.cancelled() and place is not None:
                del queue[place]
                if not queue:
                    del self._queues[priority][owner]

    def _release(self, item) -> None:
        """Under the lock: an embedding request leaves the queue for good; its slices stop counting."""
        if getattr(item, "waiting", 0):
            left = self._waiting.pop(item.owner, 0) - item.waiting
            if left > 0:
                self._waiting[item.owner] = left
            item.waiting = 0

    def _take(self, priority: int) -> tuple[str, object]:
        """Under the lock: the first owner's oldest request at ``priority``; that owner goes to the back."""
        owners = self._queues[priority]
        owner, queue = next(iter(owners.items()))
        item = queue.popleft()
        if queue:
            owners.move_to_end(owner)
        else:
            del owners[owner]
        return owner, item

    # ------------------------------------------------------------ the loop

    def _has_work(self, decoding: bool) -> bool:
        return bool(self._queues[PRIORITY_DECODE]) if decoding else any(self._queues[p] for p in PRIORITIES[1:])

    def _next(self, decoding: bool) -> tuple[list[_Decode], Optional[tuple]]:
        """Under the lock: pending decodes (up to a batch, owners in turn), or the most urgent embedding step."""
        batch, prompts = [], 0
        while decoding and self._queues[PRIORITY_DECODE]:
            following = next(iter(self._queues[PRIORITY_DECODE].values()))[0]
            if batch and prompts + len(following.boxes) > self.max_decode_batch:
                break  # a call of at most a batch: a lone box is not made to wait for others' prompts
            _, item = self._take(PRIORITY_DECODE)
            if item.future.set_running_or_notify_cancel():  # False: cancelled, its client is gone
                batch.append(item)
                prompts += len(item.boxes)
        for priority in () if decoding else PRIORITIES[1:]:
            if self._queues[priority]:
                owner, item = self._take(priority)
                return [], (priority, owner, item)
        return batch, None

    def _run(self, decoding: bool) -> None:
        if not decoding:
            _yield_cpu_to_decoding(self.model)
        while True:
            with self._condition:
                while not self._has_work(decoding) and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    pending = [item for owners in self._queues.values() for queue in owners.values()
                               for item in queue]
                    self._queues = {p: OrderedDict() for p in PRIORITIES}
                    break
                batch, entry = self._next(decoding)
            try:
                if batch:
                    self._decode(batch)
                elif entry is not None:
                    self._embed_step(*entry)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any one request
                if not isinstance(err, Cancelled):
                    log.exception("model worker step failed")
                for item in batch or [entry[2]]:
                    with self._condition:
                        self._release(item)
                    settle(item.future, error=err)
        for item in pending:
            settle(item.future, error=Cancelled("the server is shutting down"))

    def _decode(self, items: list[_Decode]) -> None:
        groups: dict[tuple, list[_Decode]] = {}
        for item in items:
            groups.setdefault(item.group, []).append(item)
        for group in groups.values():
            try:
                if group[0].alternatives:
                    probabilities = self.model.decode_alternatives(_joined(group, "embeddings"),
                                                                   _joined(group, "boxes"), group[0].image_shape)
                else:
                    keys = None if group[0].keys is None else [key for item in group for key in item.keys]
                    probabilities = self.model.decode(_joined(group, "embeddings"), _joined(group, "boxes"),
                                                      group[0].image_shape, _joined(group, "points"),
                                                      _joined(group, "point_labels"), keys)
            except Exception as err:  # noqa: BLE001 - one bad request must not fail its batch mates: retry one by one
                if len(group) == 1:
                    group[0].future.set_exception(err)
                else:
                    for item in group:
                        self._decode([item])
                continue
            start = 0
            for item in group:
                settle(item.future, probabilities[start:start + len(item.boxes)])
                start += len(item.boxes)
            with self._condition:
                self._stats["decode_calls"] += 1
                self._stats["decoded_prompts"] += len(probabilities)
                self._stats["largest_decode_batch"] = max(self._stats["largest_decode_batch"], len(probabilities))

    def _embed_step(self, priority: int, owner: str, item: _Embed) -> None:
        if item.future.cancelled():  # its client went away: no more steps
            item.steps.close()
            with self._condition:
                self._release(item)
            return
        try:
            next(item.steps)
        except StopIteration as done:
            with self._condition:
                self._stats["cache_reused_slices"] += done.value[1]
                self._release(item)
            settle(item.future, done.value)
            return
        with self._condition:  # first in its owner's line again, the owner behind the others
            self._queues[priority].setdefault(owner, deque()).appendleft(item)


def _joined(group: list[_Decode], name: str) -> Optional[np.ndarray]:
    """One field of a group's requests as one array; a request alone keeps its own (no 4 MiB copy per slice)."""
    parts = [getattr(item, name) for item in group]
    if parts[0] is None:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _yield_cpu_to_decoding(model: Any) -> None:
    """Run the encoder (this thread and its runtime's pool) at a lower CPU priority than the decoder.

    On a small CPU someone's encoding and another user's box on a cached slice compete for the
    same cores; at an equal priority the box's decode ran at a fraction of its idle speed.
    Linux only (a thread's nice value is its own there, and threads it starts inherit it).
    """
    try:
        own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(MAX_NICE, own + ENCODER_NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: both run at one priority
        return
    reopen = getattr(getattr(model, "runtime", None), "open_encoder_here", None)
    if reopen is not None:
        reopen()  # ONNX Runtime's intra-op threads start from this thread and inherit its priority


class WorkerModel:
    """The model interface of ``SliceStack`` and ``annotate`` over a :class:`ModelWorker`.

    Embedding requests run at ``priority``; ``should_stop`` (a job's cancel) is checked
    before each chunk, in addition to the caller's own.
    """

    def __init__(self, worker: ModelWorker, priority: int = PRIORITY_SEGMENT,
                 should_stop: Optional[Callable[[], bool]] = None, owner: str = ""):
        self.worker = worker
        self.name = worker.model.name
        self.priority = priority
        self.should_stop = should_stop
        self.owner = owner  # whose turn the work takes (round robin between owners)

    # The worker's model's, read when asked.
    device = property(lambda self: self.worker.model.device)
    decoder_batch = property(lambda self: self.worker.model.decoder_batch)
    embedding_shape = property(lambda self: self.worker.model.embedding_shape)

    def embed_cached(self, cache: EmbeddingCache, keys: Sequence[SliceKey], view_slice: ViewSlice,
                     progress: Optional[Callable[[int], None]] = None,
                     should_stop: Optional[Callable[[], bool]] = None, keep: bool = True) -> EmbedResult:
        """As ``PromptableModel.embed_cached``, on the worker (whose cache must be ``cache``)."""
        if cache is not self.worker.cache:
            raise ValueError("a WorkerModel embeds into its worker's cache")
        return self.embed_future(keys, view_slice, progress, should_stop, keep).result()

    def embed_future(self, keys: Sequence[SliceKey], view_slice: ViewSlice,
                     progress: Optional[Callable[[int], None]] = None,
                     should_stop: Optional[Callable[[], bool]] = None, keep: bool = True) -> Future:
        """As :meth:`embed_cached` (into the worker's cache), not waited for: the future of its result."""
        stops = [f for f in (should_stop, self.should_stop) if f is not None]
        return self.worker.embed(keys, view_slice, self.priority, progress,
                                 (lambda: any(f() for f in stops)) if stops else None, keep, self.owner)

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int],
               points: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
               keys: Optional[Sequence[SliceKey]] = None) -> np.ndarray:
        """As ``PromptableModel.decode``: (N, H, W) float32 probabilities, batched with other requests."""
        return self.decode_future(embeddings, boxes, image_shape, points, point_labels, keys).result()

    def decode_future(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int],
                      points: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                      keys: Optional[Sequence[SliceKey]] = None) -> Future:
        """As :meth:`decode`, not waited for: the future of its probabilities."""
        return self.worker.decode(embeddings, boxes, image_shape, points, point_labels, self.owner, keys=keys)

    def alternatives_future(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int]) -> Future:
        """The future of ``PromptableModel.decode_alternatives``' (N, 3, H, W) probabilities, on the decode thread."""
        return self.worker.decode(embeddings, boxes, image_shape, owner=self.owner, alternatives=True)
