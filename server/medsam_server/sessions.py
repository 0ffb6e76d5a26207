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

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import wire
from .annotate import annotate, plan, slices_to_decode
from .embeddings import EmbeddingCache, volume_digest
from .errors import Busy, UnknownSession, WireError
from .geometry import changed_block
from .intensity import check_finite
from .jobs import Job, JobBook, run_job
from .protocol import IMAGE_DTYPES, Limits
from .requests import (
    SegmentRequest,
    SliceParams,
    parse_annotate_request,
    parse_prefetch_request,
    parse_segment_request,
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
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    stacks: OrderedDict = field(default_factory=OrderedDict)
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
                 max_sessions: int, max_total_bytes: int, max_active_jobs: int = 4):
        self.worker = worker
        self.cache = cache
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.max_sessions = max_sessions
        self.max_total_bytes = max_total_bytes
        self.max_active_jobs = max_active_jobs
        self._sessions: dict[str, ServerSession] = {}
        self._lock = threading.Lock()
        self.job_pool = ThreadPoolExecutor(max_workers=max_active_jobs, thread_name_prefix="medsam-job")

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.jobs.cancel_all()
        self.job_pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- lifecycle

    def create(self, body: bytes, owner: str) -> tuple[ServerSession, str]:
        """An upload envelope -> a new session and its key (returned to the client once)."""
        header, array = wire.decode(body, self.limits, IMAGE_DTYPES, allow_rgb=True)
        unknown = sorted(set(header) - {"array"})
        if unknown:
            raise WireError(f"the upload header has unknown key(s) {', '.join(map(repr, unknown))}")
        if array is None:
            raise WireError("an upload carries a volume: the envelope header needs an 'array' entry")
        geometry = wire.geometry(header["array"])
        check_finite(array, "the uploaded image")
        digest = volume_digest(array)
        self.expire()
        with self._lock:
            held = sum(s.array.nbytes for s in self._sessions.values())
            if len(self._sessions) >= self.max_sessions:
                raise Busy(f"the server holds its maximum of {self.max_sessions} sessions; delete one you no longer "
                           "need (or wait for idle ones to expire)")
            if held + array.nbytes > self.max_total_bytes:
                raise Busy(f"the server holds {held / 2**30:.2f} GiB of volumes and may hold "
                           f"{self.max_total_bytes / 2**30:.2f} GiB; delete sessions you no longer need")
            key = secrets.token_urlsafe(32)
            session_id = secrets.token_urlsafe(16)
            session = ServerSession(session_id, secret_hash(key), owner, array, geometry, digest,
                                    JobBook(session_id, self.max_active_jobs))
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
            shared = any(s.digest == session.digest for s in self._sessions.values())
        session.jobs.cancel_all()
        if not shared:
            self.cache.drop_volume(session.digest)

    def expire(self, now: Optional[float] = None) -> int:
        """Drop sessions idle longer than the limit (their embeddings stay cached for a re-upload)."""
        now = time.monotonic() if now is None else now
        with self._lock:
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
                                   WorkerModel(self.worker), self.cache, params.orientation, session.digest)
                session.stacks[key] = stack
                while len(session.stacks) > STACKS_PER_SESSION:
                    session.stacks.popitem(last=False)
            session.stacks.move_to_end(key)
        return stack.using(WorkerModel(self.worker, priority, should_stop))

    def segment(self, session: ServerSession, raw: Any) -> tuple[SegmentRequest, np.ndarray]:
        """Masks (N, rows, cols) bool, one per box of the request, in slice pixels."""
        request = parse_segment_request(raw, session.size_ijk, self.limits)
        stack = self._stack(session, request.params, PRIORITY_SEGMENT)
        masks = np.zeros((len(request.entries), *stack.shape), dtype=bool)
        live = []
        for n, entry in enumerate(request.entries):
            if stack.is_constant(entry.slice):
                request.notes.append(f"slice {entry.slice} is constant; its mask is empty")
            else:
                live.append(n)
        if not live:
            return request, masks
        embeddings, _ = stack.embeddings([request.entries[n].slice for n in live])
        groups: dict[Optional[int], list[int]] = {}  # decoded together: the same number of points
        for position, n in enumerate(live):
            points = request.entries[n].points
            groups.setdefault(None if points is None else len(points), []).append(position)
        for count, positions in groups.items():
            entries = [request.entries[live[p]] for p in positions]
            points = None if count is None else np.array([e.points for e in entries])
            labels = None if count is None else np.array([e.point_labels for e in entries])
            found = stack.masks(embeddings[positions], np.array([e.box for e in entries]), points, labels)
            for p, mask in zip(positions, found, strict=True):
                masks[live[p]] = mask
        return request, masks

    def start_prefetch(self, session: ServerSession, raw: Any) -> Job:
        """Embed a slice range in the background; returns the job to poll."""
        request = parse_prefetch_request(raw, session.size_ijk)
        job = session.jobs.new("prefetch")

        def work(job: Job) -> None:
            stack = self._stack(session, request.params, PRIORITY_PREFETCH, job.cancel.is_set)
            live = [i for i in request.slices if not stack.is_constant(i)]
            job.set_progress(len(request.slices) - len(live), len(request.slices), "embedding")
            stack.embeddings(live, progress=job.advance, keep=False)

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

            result = annotate(session.array, session.geometry.direction_matrix, prompts, stack.model, self.cache,
                              options, existing, progress, job.cancel.is_set, session.digest, stack=stack)
            offset, block = changed_block(result.labels, result.changed_slices, prompts.axis)
            summary = {**result.summary(), "changed_slices": result.changed_slices, "axis": prompts.axis}
            meta = {} if block is None else {"array": {"offset": list(offset)}}
            return wire.encode({"summary": summary, **meta}, block)

        self.job_pool.submit(run_job, job, work)
        return job
