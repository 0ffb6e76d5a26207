"""Server sessions: an uploaded volume, who may use it, and the work done on it.

A session holds one volume (never written to disk) and is reached by its id plus a
secret *key* returned once at upload (sent in a header, so it never shows in a URL
or an access log). When the server has tokens, the session also belongs to the
token that created it: another token gets "unknown session" even with the key.
Sessions expire after an idle time; an explicit delete also forgets the volume's
embeddings (unless another session holds the same volume).

Work on a session (request bodies are parsed by ``requests.py``, jobs kept by ``jobs.py``):
- ``segment``: boxes (and optional points) on slices -> one mask per box, waiting only
  for the embeddings of those slices (computed at ``PRIORITY_SEGMENT`` if missing);
- prefetch jobs: embed a slice range in the background (lowest priority);
- annotate jobs: the prompt document run by ``annotate.annotate`` on the model worker;
  the result is the block of changed slices, already encoded.

Frames: boxes and points are (u, v) slice pixels as in the prompt document; masks
are (rows = v, cols = u); volumes are (k, j, i[, 3]); offsets (i0, j0, k0).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import wire
from .annotate import plan, slices_to_decode
from .embeddings import EmbeddingCache, volume_digest
from .errors import Busy, InputError, UnknownSession, WireError
from .geometry import changed_block
from .intensity import check_finite
from .jobs import Job, JobBook, run_job
from .multiview import annotate_multiview
from .protocol import IMAGE_DTYPES, MASK_THRESHOLD, Limits
from .refine import kept_review, merge, set_thresholds, threshold_answer
from .requests import (
    SegmentRequest,
    SliceParams,
    parse_annotate_request,
    parse_prefetch_request,
    parse_segment_request,
    parse_threshold_request,
)
from .stack import SliceStack
from .worker import PRIORITY_ANNOTATE, PRIORITY_PREFETCH, PRIORITY_SEGMENT, ModelWorker, WorkerModel

log = logging.getLogger(__name__)

STACKS_PER_SESSION = 2  # (axis, window) views kept per session; each is one uint8 copy of the volume


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class ServerSession:
    """One uploaded volume on the server, its key and owner, its jobs and its slice views."""

    id: str
    key_hash: str
    owner: str  # sha256 of the creating token, "" when the server has no tokens
    array: np.ndarray  # (k, j, i) or (k, j, i, 3)
    geometry: wire.Geometry
    digest: str
    jobs: JobBook
    cache_volume: str = ""  # the volume's name in the embedding cache: its digest, kept apart per owner
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    stacks: OrderedDict = field(default_factory=OrderedDict)
    runs: dict = field(default_factory=dict)  # segment label -> refine.SegmentRun of its last annotate run
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape[:3]
        return int(i), int(j), int(k)

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def describe(self) -> dict:
        return {"session": self.id, "shape": list(self.array.shape), "dtype": self.array.dtype.name,
                "size_ijk": list(self.size_ijk), "digest": self.digest, **self.geometry.as_dict(),
                "idle_seconds": round(time.monotonic() - self.last_used, 1),
                "jobs": [job.status() for job in self.jobs.all()]}


class Sessions:
    """All sessions of a server and the operations on them; thread-safe, blocking (call from worker threads)."""

    def __init__(self, worker: ModelWorker, cache: EmbeddingCache, limits: Limits, idle_seconds: float,
                 max_sessions: int, max_total_bytes: int, max_active_jobs: int = 4,
                 owner_sessions: Optional[int] = None, owner_bytes: Optional[int] = None, share_cache: bool = True):
        self.worker = worker
        self.cache = cache
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.max_sessions = max_sessions
        self.max_total_bytes = max_total_bytes
        self.max_active_jobs = max_active_jobs
        # Per owner (token): one user cannot take every slot or all the memory from the others.
        self.owner_sessions = owner_sessions or max_sessions
        self.owner_bytes = owner_bytes or max_total_bytes
        self.share_cache = share_cache  # False: an owner never finds another owner's embeddings (nor their timing)
        self._sessions: dict[str, ServerSession] = {}
        self._uploading: list[tuple[str, int]] = []  # (owner, declared bytes) of uploads being decoded
        self._lock = threading.Lock()
        # Threads only wait on the worker, which shares itself fairly: one user's jobs must not queue another's.
        self.job_pool = ThreadPoolExecutor(max_workers=max_active_jobs * max_sessions, thread_name_prefix="medsam-job")

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def count(self, owner: str) -> int:
        """How many sessions ``owner`` holds."""
        with self._lock:
            return sum(s.owner == owner for s in self._sessions.values())

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.jobs.cancel_all()
        self.job_pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- lifecycle

    def create(self, body: bytes, owner: str) -> tuple[ServerSession, str]:
        """An upload envelope -> a new session and its key (returned to the client once).

        The size the envelope declares is charged to the session and memory caps (the server's and
        the owner's) before it is decoded, so uploads under way count as much as sessions held.
        """
        declared = wire.declared_bytes(body, self.limits, IMAGE_DTYPES, allow_rgb=True)
        self.expire()
        with self._lock:
            self._admit(owner, declared)
            self._uploading.append((owner, declared))
        try:
            return self._create(body, owner)
        finally:
            with self._lock:
                self._uploading.remove((owner, declared))

    def _admit(self, owner: str, nbytes: int) -> None:
        """Under the lock: Busy unless one more session of ``nbytes`` fits the server's and the owner's caps."""
        held = [(s.owner, s.array.nbytes) for s in self._sessions.values()] + self._uploading
        mine = [n for o, n in held if o == owner]
        if len(held) >= self.max_sessions:
            raise Busy(f"the server holds its maximum of {self.max_sessions} sessions; delete one you no longer "
                       "need (or wait for idle ones to expire)")
        if len(mine) >= self.owner_sessions:
            raise Busy(f"this token holds {len(mine)} sessions, as many as one token may; delete one you no longer "
                       "need")
        total = sum(n for _, n in held)
        if total + nbytes > self.max_total_bytes:
            raise Busy(f"the server holds {total / 2**30:.2f} GiB of volumes and may hold "
                       f"{self.max_total_bytes / 2**30:.2f} GiB; delete sessions you no longer need")
        if sum(mine) + nbytes > self.owner_bytes:
            raise Busy(f"this token holds {sum(mine) / 2**30:.2f} GiB of volumes and one token may hold "
                       f"{self.owner_bytes / 2**30:.2f} GiB; delete sessions you no longer need")

    def _create(self, body: bytes, owner: str) -> tuple[ServerSession, str]:
        header, array = wire.decode(body, self.limits, IMAGE_DTYPES, allow_rgb=True)
        unknown = sorted(set(header) - {"array"})
        if unknown:
            raise WireError(f"the upload header has unknown key(s) {', '.join(map(repr, unknown))}")
        if array is None:
            raise WireError("an upload carries a volume: the envelope header needs an 'array' entry")
        geometry = wire.geometry(header["array"])
        check_finite(array, "the uploaded image")
        digest = volume_digest(array)
        cache_volume = digest if self.share_cache or not owner else secret_hash(f"{owner}:{digest}")
        with self._lock:
            key = secrets.token_urlsafe(32)
            session_id = secrets.token_urlsafe(16)
            session = ServerSession(session_id, secret_hash(key), owner, array, geometry, digest,
                                    JobBook(session_id, self.max_active_jobs), cache_volume)
            self._sessions[session.id] = session
        log.info("session %s: %s %s uploaded", session.id[:6], array.dtype, array.shape)
        return session, key

    def get(self, session_id: str, owner: str, key: Optional[str]) -> ServerSession:
        with self._lock:
            session = self._sessions.get(session_id)
        # The same answer whether the session is missing, someone else's, or the key is wrong.
        if session is None or not hmac.compare_digest(session.owner, owner) or \
                not hmac.compare_digest(session.key_hash, secret_hash(key or "")):
            raise UnknownSession(f"unknown session {session_id[:64]!r} (deleted, expired, or not yours); "
                                 "upload the volume again")
        session.touch()
        return session

    def delete(self, session: ServerSession) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            shared = any(s.cache_volume == session.cache_volume for s in self._sessions.values())
        session.jobs.cancel_all()
        if not shared:
            self.cache.drop_volume(session.cache_volume)

    def expire(self, now: Optional[float] = None) -> int:
        """Drop sessions idle longer than the limit (their embeddings stay cached for a re-upload), and cancel
        annotate jobs that no client watches any more."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for session in self._sessions.values():
                session.jobs.cancel_unwatched(now)
            stale = [s for s in self._sessions.values() if now - s.last_used > self.idle_seconds and not s.jobs.busy]
            for session in stale:
                del self._sessions[session.id]
        for session in stale:
            log.info("session %s expired", session.id[:6])
        return len(stale)

    # -------------------------------------------------------------- work

    def _stack(self, session: ServerSession, params: SliceParams, priority: int,
               should_stop=None) -> SliceStack:
        """The session's volume as slices (kept for the next request), through the worker at ``priority``."""
        key = (params.axis, json.dumps(params.window), params.orientation)
        with session.lock:
            stack = session.stacks.get(key)
            if stack is None:
                stack = SliceStack(session.array, session.geometry.direction_matrix, params.axis, params.window,
                                   WorkerModel(self.worker), self.cache, params.orientation, session.cache_volume)
                session.stacks[key] = stack
                while len(session.stacks) > STACKS_PER_SESSION:
                    session.stacks.popitem(last=False)
            session.stacks.move_to_end(key)
        return stack.using(WorkerModel(self.worker, priority, should_stop, session.owner))

    async def segment(self, session: ServerSession, raw: Any,
                      run: Callable[..., Awaitable]) -> tuple[SegmentRequest, np.ndarray]:
        """Masks (N, rows, cols) bool, one per box of the request, in slice pixels.

        A coroutine: ``run(function, *args)`` does the blocking parts (parsing, the slice view) on a
        thread, and the model work is awaited on the worker's futures, so no thread waits for the
        encoder; cancelling it (the client went away) drops the work still queued.
        """
        request, stack, live = await run(self._segment_plan, session, raw)
        masks = np.zeros((len(request.entries), *stack.shape), dtype=bool)
        if not live:
            return request, masks
        indices = [request.entries[n].slice for n in live]
        keys = [stack.key(i) for i in indices]
        cached = [self.cache.get(key) for key in keys]
        if all(e is not None for e in cached):  # the common case: straight to the decoder, no turn to wait for
            embeddings = np.stack(cached)
        else:
            embedded = self.worker.embed(keys, lambda n: stack.view.to_view(stack.plane(indices[n])),
                                         PRIORITY_SEGMENT, owner=session.owner)
            embeddings, _ = await asyncio.wrap_future(embedded)
        groups: dict[Optional[int], list[int]] = {}  # decoded together: the same number of points
        for position, n in enumerate(live):
            points = request.entries[n].points
            groups.setdefault(None if points is None else len(points), []).append(position)
        for count, positions in groups.items():
            entries = [request.entries[live[p]] for p in positions]
            points = None if count is None else np.array([e.points for e in entries])
            labels = None if count is None else np.array([e.point_labels for e in entries])
            boxes, shape, points = stack.prompts_to_view(np.array([e.box for e in entries]), points)
            decoded = self.worker.decode(embeddings[positions], boxes, shape, points, labels, session.owner)
            probabilities = await asyncio.wrap_future(decoded)
            found = await run(lambda p=probabilities: stack.from_view(p) > MASK_THRESHOLD)
            for p, mask in zip(positions, found, strict=True):
                masks[live[p]] = mask
        return request, masks

    def _segment_plan(self, session: ServerSession, raw: Any) -> tuple[SegmentRequest, SliceStack, list[int]]:
        """The parsed request, its slices, and which of its boxes lie on slices that are not constant."""
        request = parse_segment_request(raw, session.size_ijk, self.limits)
        stack = self._stack(session, request.params, PRIORITY_SEGMENT)
        live = []
        for n, entry in enumerate(request.entries):
            if stack.is_constant(entry.slice):
                request.notes.append(f"slice {entry.slice} is constant; its mask is empty")
            else:
                live.append(n)
        return request, stack, live

    def threshold(self, session: ServerSession, raw: Any) -> tuple[dict, np.ndarray]:
        """Move one segment's thresholds over its last annotate run (no model call): header and its masks."""
        request = parse_threshold_request(raw)
        with session.lock:
            run = session.runs.get(request.label)
            if run is None:
                raise InputError(f"segment label {request.label} has no annotate run in this session; "
                                 "run annotate first (the threshold moves over its probabilities)")
            set_thresholds(run, request.threshold, request.slice_thresholds)
            return threshold_answer(run)

    def start_prefetch(self, session: ServerSession, raw: Any) -> Job:
        """Embed a slice range in the background; returns the job to poll."""
        request = parse_prefetch_request(raw, session.size_ijk)
        job = session.jobs.new("prefetch")

        def work(job: Job) -> None:
            stack = self._stack(session, request.params, PRIORITY_PREFETCH, job.cancel.is_set)
            live = [i for i in request.slices if not stack.is_constant(i)]
            job.set_progress(len(request.slices) - len(live), len(request.slices), "embedding")
            _, job.cached = stack.embeddings(live, progress=job.advance, keep=False)

        self.job_pool.submit(run_job, job, work)
        return job

    def start_annotate(self, session: ServerSession, header: Any, existing: Optional[np.ndarray]) -> Job:
        """Validate a prompt document (errors now, before a job exists) and run it as a job."""
        prompts, options = parse_annotate_request(header, session.size_ijk,
                                                  None if existing is None else existing.shape)
        job = session.jobs.new("annotate")

        def work(job: Job) -> bytes:
            params = SliceParams(prompts.axis, prompts.window, options.orientation)
            stack = self._stack(session, params, PRIORITY_ANNOTATE, job.cancel.is_set)
            # Embed every keyframe range first, so that progress moves during the slow part;
            # annotate() then finds them cached.
            needed = [i for i in slices_to_decode(prompts, plan(prompts, options)) if not stack.is_constant(i)]
            job.set_progress(0, len(needed), "embedding")
            stack.embeddings(needed, progress=job.advance, keep=False)

            def progress(phase: str, done: int, total: int) -> None:
                job.set_progress(len(needed) + done, len(needed) + total, phase)

            result = annotate_multiview(session.array, session.geometry.direction_matrix, session.geometry.spacing,
                                        prompts, stack.model, self.cache, options, existing=existing,
                                        progress=progress, should_stop=job.cancel.is_set,
                                        digest=session.cache_volume, stack=stack)
            offset, block = changed_block(result.labels, result.changed_slices, prompts.axis)
            with session.lock:  # kept so that a threshold can move without a model call
                for done in result.segments:
                    session.runs[done.label] = merge(session.runs.get(done.label), done.run, options.only_slice)
                # a re-boxed slice is reviewed within its segment's kept run (its neighbours count)
                review = [d.review if options.only_slice is None else kept_review(session.runs[d.label])
                          for d in result.segments]
            summary = {**result.summary(), "changed_slices": result.changed_slices, "axis": prompts.axis,
                       "review": review}
            meta = {} if block is None else {"array": {"offset": list(offset)}}
            return wire.encode({"summary": summary, **meta}, block)

        self.job_pool.submit(run_job, job, work)
        return job
