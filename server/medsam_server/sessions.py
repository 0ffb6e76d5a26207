"""Server sessions: an uploaded volume, who may use it, and the work done on it.

A session holds one volume (never written to disk) and is reached by its id plus a
secret *key* returned once at upload (sent in a header, so it never shows in a URL
or an access log). When the server has tokens, the session also belongs to the
token that created it: another token gets "unknown session" even with the key.
Sessions expire after an idle time; an explicit delete also forgets the volume's
embeddings (unless another session holds the same volume).

Work on a session:
- ``segment``: boxes (and optional points) on slices -> one mask per box, waiting only
  for the embeddings of those slices (computed at ``PRIORITY_SEGMENT`` if missing);
- prefetch jobs: embed a slice range in the background (lowest priority);
- annotate jobs: the prompt document of DESIGN.md section 4 run by ``annotate.annotate``
  on the model worker; the result is the block of changed slices, already encoded.

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
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from . import wire
from .annotate import AnnotateOptions, SliceStack, annotate, interpolate_boxes, slice_index
from .embeddings import EmbeddingCache, volume_digest
from .errors import Cancelled, InputError
from .preprocess import DEFAULT_ORIENTATION, ORIENTATIONS, check_box, check_finite, parse_window
from .prompts import PromptDocument, parse_prompts, slice_shape
from .worker import PRIORITY_ANNOTATE, PRIORITY_PREFETCH, PRIORITY_SEGMENT, ModelWorker, WorkerModel

log = logging.getLogger(__name__)

STACKS_PER_SESSION = 2  # (axis, window) views kept per session; each is one uint8 copy of the volume
FINISHED_JOBS_KEPT = 8
MAX_BATCH_SIZE = 64


class UnknownSession(LookupError):
    """No such session for this caller (never says whether it exists for someone else)."""


class UnknownJob(LookupError):
    pass


class Busy(RuntimeError):
    """The server holds as much as it may; the message says what to free."""


class NotFinished(RuntimeError):
    pass


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------ jobs


@dataclass
class Job:
    """A background run (prefetch or annotate) that a client polls, fetches and may cancel."""

    kind: str
    session_id: str
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    phase: str = ""
    done: int = 0
    total: int = 0
    error: Optional[str] = None
    error_status: Optional[int] = None
    result: Optional[bytes] = None  # an envelope (annotate)
    details: dict = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    ended: Optional[float] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def active(self) -> bool:
        return not self.finished.is_set()

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n

    def set_progress(self, done: int, total: int, phase: Optional[str] = None) -> None:
        with self.lock:
            self.done, self.total = done, total
            if phase:
                self.phase = phase

    def finish(self, error: Optional[BaseException] = None, result: Optional[bytes] = None,
               details: Optional[dict] = None) -> None:
        with self.lock:
            if isinstance(error, Cancelled) or (error is None and self.cancel.is_set() and result is None):
                self.state = "cancelled"
            elif error is not None:
                self.state = "failed"
                self.error = str(error) if isinstance(error, (InputError, wire.WireError)) else \
                    f"internal error ({type(error).__name__}): {error}"
                self.error_status = 422 if isinstance(error, InputError) else 500
            else:
                self.state, self.result = "done", result
            self.details.update(details or {})
            self.ended = time.monotonic()
        self.finished.set()

    def finish_from(self, future: Future) -> None:
        error = future.exception()
        if error is not None and not isinstance(error, (Cancelled, InputError)):
            log.error("%s job %s failed", self.kind, self.id, exc_info=error)
        self.finish(error)

    def status(self) -> dict:
        with self.lock:
            end = self.ended if self.ended is not None else time.monotonic()
            return {"job": self.id, "kind": self.kind, "state": self.state, "phase": self.phase, "done": self.done,
                    "total": self.total, "error": self.error, "error_status": self.error_status,
                    "seconds": round(end - self.created, 3), **self.details}


# ------------------------------------------------------------------ sessions


@dataclass
class Session:
    id: str
    key_hash: str
    owner: str  # sha256 of the creating token, "" when the server has no tokens
    array: np.ndarray  # (k, j, i) or (k, j, i, 3)
    geometry: wire.Geometry
    digest: str
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    jobs: dict[str, Job] = field(default_factory=dict)
    stacks: OrderedDict = field(default_factory=OrderedDict)
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        k, j, i = self.array.shape[:3]
        return int(i), int(j), int(k)

    @property
    def busy(self) -> bool:
        return any(job.active for job in list(self.jobs.values()))

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def describe(self) -> dict:
        return {"session": self.id, "shape": list(self.array.shape), "dtype": self.array.dtype.name,
                "size_ijk": list(self.size_ijk), "digest": self.digest, **self.geometry.as_dict(),
                "idle_seconds": round(time.monotonic() - self.last_used, 1),
                "jobs": [job.status() for job in list(self.jobs.values())]}


@dataclass(frozen=True)
class SegmentEntry:
    slice: int
    box: np.ndarray  # (4,) slice pixels, clipped to the slice
    points: Optional[np.ndarray]  # (P, 2) slice pixels
    point_labels: Optional[np.ndarray]  # (P,) 1 inside, 0 outside


@dataclass(frozen=True)
class SegmentRequest:
    axis: int
    window: Any
    orientation: str
    entries: list[SegmentEntry]
    notes: list[str]


class Sessions:
    """All sessions of a server and the operations on them; thread-safe, blocking (call from worker threads)."""

    def __init__(self, worker: ModelWorker, cache: EmbeddingCache, limits: wire.Limits, idle_seconds: float,
                 max_sessions: int, max_total_bytes: int, max_active_jobs: int = 4):
        self.worker = worker
        self.cache = cache
        self.limits = limits
        self.idle_seconds = idle_seconds
        self.max_sessions = max_sessions
        self.max_total_bytes = max_total_bytes
        self.max_active_jobs = max_active_jobs
        self._sessions: dict[str, Session] = {}
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
            self._cancel_jobs(session)
        self.job_pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------- lifecycle

    def create(self, body: bytes, owner: str) -> tuple[Session, str]:
        """An upload envelope -> a new session and its key (returned to the client once)."""
        header, array = wire.decode(body, self.limits, wire.IMAGE_DTYPES, allow_rgb=True)
        unknown = sorted(set(header) - {"array"})
        if unknown:
            raise wire.WireError(f"the upload header has unknown key(s) {', '.join(map(repr, unknown))}")
        if array is None:
            raise wire.WireError("an upload carries a volume: the envelope header needs an 'array' entry")
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
            session = Session(secrets.token_urlsafe(16), secret_hash(key), owner, array, geometry, digest)
            self._sessions[session.id] = session
        log.info("session %s: %s %s uploaded", session.id[:6], array.dtype, array.shape)
        return session, key

    def get(self, session_id: str, owner: str, key: Optional[str]) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        # The same answer whether the session is missing, someone else's, or the key is wrong.
        if session is None or not hmac.compare_digest(session.owner, owner) or \
                not hmac.compare_digest(session.key_hash, secret_hash(key or "")):
            raise UnknownSession(f"unknown session {session_id[:64]!r} (deleted, expired, or not yours); "
                                 "upload the volume again")
        session.touch()
        return session

    def delete(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            shared = any(s.digest == session.digest for s in self._sessions.values())
        self._cancel_jobs(session)
        if not shared:
            self.cache.drop_volume(session.digest)

    def expire(self, now: Optional[float] = None) -> int:
        """Drop sessions idle longer than the limit (their embeddings stay cached for a re-upload)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [s for s in self._sessions.values() if now - s.last_used > self.idle_seconds and not s.busy]
            for session in stale:
                del self._sessions[session.id]
        for session in stale:
            log.info("session %s expired", session.id[:6])
        return len(stale)

    def _cancel_jobs(self, session: Session) -> None:
        for job in list(session.jobs.values()):
            job.cancel.set()

    # -------------------------------------------------------------- slices

    def _stack(self, session: Session, axis: int, window: Any, orientation: str) -> SliceStack:
        """The session's volume as slices along ``axis`` through ``window`` (kept for the next request)."""
        key = (axis, json.dumps(window), orientation)
        with session.lock:
            stack = session.stacks.get(key)
            if stack is None:
                stack = SliceStack(session.array, session.geometry.direction_matrix, axis, window,
                                   WorkerModel(self.worker), self.cache, orientation, session.digest)
                session.stacks[key] = stack
                while len(session.stacks) > STACKS_PER_SESSION:
                    session.stacks.popitem(last=False)
            session.stacks.move_to_end(key)
            return stack

    def _embed(self, stack: SliceStack, indices: Sequence[int], priority: int, keep: bool = True,
               should_stop=None, on_progress=None) -> Optional[np.ndarray]:
        """Embeddings of slices ``indices`` (N, 256, 64, 64): cached ones here, the rest on the worker."""
        keys = [stack.key(i) for i in indices]
        found: dict[int, np.ndarray] = {}
        missing = []
        for n, key in enumerate(keys):
            cached = (self.cache.get(key) if keep else True) if key in self.cache else None
            if cached is None:
                missing.append(n)
            else:
                found[n] = cached
        if on_progress is not None and found:
            on_progress(len(found))
        if keep and not missing and len(found) == 1:
            return found[0][np.newaxis]  # the common case, a box on one cached slice: no copy
        out = np.empty((len(indices), 256, 64, 64), dtype=np.float32) if keep else None
        if out is not None:
            for n, cached in found.items():
                out[n] = cached
        if missing:
            images = [(lambda i=indices[n]: stack.view.to_view(stack.u8[slice_index(stack.axis, i)])) for n in missing]
            future = self.worker.encode(images, [keys[n] for n in missing], priority, should_stop, on_progress,
                                        keep=keep)
            embedded = future.result()
            if out is not None:
                out[missing] = embedded
        return out

    # -------------------------------------------------------------- segment

    def segment(self, session: Session, raw: dict) -> tuple[SegmentRequest, np.ndarray]:
        """Masks (N, rows, cols) bool, one per box of the request, in slice pixels."""
        request = parse_segment_request(raw, session.size_ijk, self.limits)
        stack = self._stack(session, request.axis, request.window, request.orientation)
        masks = np.zeros((len(request.entries), *stack.shape), dtype=bool)
        live = []
        for n, entry in enumerate(request.entries):
            if stack.is_constant(entry.slice):
                request.notes.append(f"slice {entry.slice} is constant; its mask is empty")
            else:
                live.append(n)
        if not live:
            return request, masks
        embeddings = self._embed(stack, [request.entries[n].slice for n in live], PRIORITY_SEGMENT)
        groups: dict[Optional[int], list[int]] = {}
        for position, n in enumerate(live):
            points = request.entries[n].points
            groups.setdefault(None if points is None else len(points), []).append(position)
        for count, positions in groups.items():
            entries = [request.entries[live[p]] for p in positions]
            boxes = np.array([e.box for e in entries])
            if count is None:
                probabilities = stack.decode(embeddings[positions], boxes)
            else:
                probabilities = _decode_with_points(stack, embeddings[positions], boxes, entries)
            for p, probability in zip(positions, probabilities, strict=True):
                masks[live[p]] = probability > 0.5
        return request, masks

    # -------------------------------------------------------------- jobs

    def _new_job(self, session: Session, kind: str) -> Job:
        with session.lock:
            active = sum(job.active for job in session.jobs.values())
            if active >= self.max_active_jobs:
                raise Busy(f"the session already runs {active} jobs; wait for one or cancel it")
            finished = [j for j in session.jobs.values() if not j.active]
            for old in finished[:max(0, len(finished) - FINISHED_JOBS_KEPT + 1)]:
                del session.jobs[old.id]
            job = Job(kind, session.id)
            session.jobs[job.id] = job
            return job

    def job(self, session: Session, job_id: str) -> Job:
        job = session.jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"unknown job {job_id[:64]!r} for this session")
        return job

    def start_prefetch(self, session: Session, raw: dict) -> Job:
        """Embed a slice range in the background; returns the job to poll."""
        if not isinstance(raw, dict):
            raise InputError("a prefetch request is a JSON object")
        _no_unknown(raw, {"axis", "window", "orientation", "first", "last", "around"}, "the prefetch request")
        axis = _axis(raw.get("axis", 2))
        window = parse_window(raw.get("window", "auto"))
        orientation = _orientation(raw.get("orientation", DEFAULT_ORIENTATION))
        n = session.size_ijk[axis]
        first = _int(raw.get("first", 0), 0, n - 1, "first")
        last = _int(raw.get("last", n - 1), first, n - 1, "last")
        indices = list(range(first, last + 1))
        if raw.get("around") is not None:  # nearest first: the slices a user looks at come first
            around = _int(raw["around"], 0, n - 1, "around")
            indices.sort(key=lambda i: (abs(i - around), i))
        stack = self._stack(session, axis, window, orientation)
        job = self._new_job(session, "prefetch")
        live = [i for i in indices if not stack.is_constant(i)]
        job.set_progress(len(indices) - len(live), len(indices), "embedding")
        job.state = "running"
        missing = [i for i in live if stack.key(i) not in self.cache]
        job.advance(len(live) - len(missing))
        images = [(lambda i=i: stack.view.to_view(stack.u8[slice_index(axis, i)])) for i in missing]
        # keep=False: a long prefetch must not hold every embedding twice (the cache has them)
        future = self.worker.encode(images, [stack.key(i) for i in missing], PRIORITY_PREFETCH, job.cancel.is_set,
                                    job.advance, keep=False)
        future.add_done_callback(job.finish_from)
        return job

    def start_annotate(self, session: Session, header: dict, existing: Optional[np.ndarray]) -> Job:
        """Validate a prompt document (errors now, as 422) and run it as a job."""
        _no_unknown(header, {"document", "options", "array"}, "the annotate request")
        if "document" not in header:
            raise InputError("the annotate request needs a 'document' (the prompt document of DESIGN.md section 4)")
        prompts = parse_prompts(header["document"], session.size_ijk)
        options = parse_options(header.get("options", {}), session.size_ijk[prompts.axis])
        if existing is not None and existing.shape != session.array.shape[:3]:
            raise InputError(f"the existing segmentation has shape {list(existing.shape)}; the session's volume is "
                             f"{list(session.array.shape[:3])}")
        job = self._new_job(session, "annotate")
        self.job_pool.submit(self._run_annotate, session, job, prompts, options, existing)
        return job

    def _run_annotate(self, session: Session, job: Job, prompts: PromptDocument, options: AnnotateOptions,
                      existing: Optional[np.ndarray]) -> None:
        try:
            if job.cancel.is_set():
                raise Cancelled("cancelled before it started")
            job.state = "running"
            stack = self._stack(session, prompts.axis, prompts.window, options.orientation)
            # Embed every keyframe range first, at annotate priority and deduplicated against prefetch,
            # so that progress moves during the slow part; annotate() then finds them cached.
            needed: set[int] = set()
            for segment in prompts.segments:
                needed |= set(interpolate_boxes(segment, options.interpolation)) - set(segment.locked_slices)
            needed_list = sorted(i for i in needed if not stack.is_constant(i))
            job.set_progress(0, len(needed_list), "embedding")
            self._embed(stack, needed_list, PRIORITY_ANNOTATE, keep=False, should_stop=job.cancel.is_set,
                        on_progress=job.advance)
            embedded = len(needed_list)

            def progress(phase: str, done: int, total: int) -> None:
                job.set_progress(embedded + done, embedded + total, phase)

            model = WorkerModel(self.worker, PRIORITY_ANNOTATE, job.cancel.is_set)
            result = annotate(session.array, session.geometry.direction_matrix, prompts, model, self.cache, options,
                              existing, progress, job.cancel.is_set, session.digest)
            offset, block = changed_block(result.labels, result.changed_slices, prompts.axis)
            summary = {**result.summary(), "changed_slices": result.changed_slices, "axis": prompts.axis}
            meta = {} if block is None else {"array": {"offset": list(offset)}}
            job.finish(result=wire.encode({"summary": summary, **meta}, block))
        except Exception as err:  # noqa: BLE001 - the job reports every failure to its poller
            if not isinstance(err, (Cancelled, InputError)):
                log.exception("annotate job %s failed", job.id)
            job.finish(err)


# ------------------------------------------------------------------ requests


def parse_segment_request(raw: Any, size_ijk: Sequence[int], limits: wire.Limits) -> SegmentRequest:
    """Validate a segment request against a volume of size (i, j, k); InputError names what is wrong."""
    if not isinstance(raw, dict):
        raise InputError("a segment request is a JSON object with 'boxes'")
    _no_unknown(raw, {"axis", "window", "orientation", "boxes"}, "the segment request")
    axis = _axis(raw.get("axis", 2))
    window = parse_window(raw.get("window", "auto"))
    orientation = _orientation(raw.get("orientation", DEFAULT_ORIENTATION))
    boxes = raw.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        raise InputError("the segment request needs a non-empty 'boxes' list of {\"slice\": k, \"box\": [...]}")
    if len(boxes) > limits.max_boxes_per_request:
        raise InputError(f"{len(boxes)} boxes in one request; the limit is {limits.max_boxes_per_request}")
    n_slices = int(size_ijk[axis])
    shape = slice_shape(size_ijk, axis)
    entries, notes, seen = [], [], set()
    for position, entry in enumerate(boxes):
        where = f"box {position}"
        if not isinstance(entry, dict) or not {"slice", "box"} <= set(entry):
            raise InputError(f"{where}: each box is {{\"slice\": k, \"box\": [u_min, v_min, u_max, v_max]}}")
        _no_unknown(entry, {"slice", "box", "points", "point_labels"}, where)
        index = _int(entry["slice"], 0, n_slices - 1, f"{where}: slice")
        where = f"box {position}, slice {index}"
        if index in seen:
            raise InputError(f"{where}: two boxes on one slice in one request; send one box per slice")
        seen.add(index)
        box, note = check_box(entry["box"], shape, where)
        if note:
            notes.append(note)
        points, labels = _points(entry, shape, limits.max_points_per_box, where)
        entries.append(SegmentEntry(index, box, points, labels))
    return SegmentRequest(axis, window, orientation, entries, notes)


def parse_options(raw: Any, n_slices: int) -> AnnotateOptions:
    """Annotate options of a request (the CLI's flags) -> AnnotateOptions; InputError on a bad one."""
    if not isinstance(raw, dict):
        raise InputError("'options' must be an object")
    kinds = {"propagate": int, "fill_holes": bool, "largest_component": bool, "overwrite": bool,
             "interpolation": str, "orientation": str, "batch_size": int}
    _no_unknown(raw, set(kinds), "'options'")
    for name, value in raw.items():
        if not isinstance(value, kinds[name]) or (kinds[name] is int and isinstance(value, bool)):
            raise InputError(f"option {name!r} must be a {kinds[name].__name__}, got {value!r}")
    options = AnnotateOptions(**raw)
    _orientation(options.orientation)
    if options.propagate > n_slices:
        raise InputError(f"propagate {options.propagate} is more than the {n_slices} slices along the axis")
    if options.batch_size is not None and options.batch_size > MAX_BATCH_SIZE:
        raise InputError(f"batch_size {options.batch_size} is above the limit of {MAX_BATCH_SIZE}")
    return options


def changed_block(labels: np.ndarray, changed: Sequence[int],
                  axis: int) -> tuple[tuple[int, int, int], Optional[np.ndarray]]:
    """The sub-block of ``labels`` (k, j, i) that a client must write, and its (i0, j0, k0) offset.

    Along ``axis`` it spans the first to the last changed slice; in-plane it is the
    bounding box of every labelled voxel of those slices (at least one voxel), so the
    block is the complete answer for its slices. None when nothing changed.
    """
    if not changed:
        return (0, 0, 0), None
    lo, hi = min(changed), max(changed) + 1
    where: list = [slice(None)] * 3
    where[2 - axis] = slice(lo, hi)
    offset = [0, 0, 0]
    offset[axis] = lo
    slab = labels[tuple(where)]
    for numpy_axis in range(3):
        if numpy_axis == 2 - axis:
            continue
        others = tuple(a for a in range(3) if a != numpy_axis)
        present = np.flatnonzero(slab.any(axis=others))
        start, stop = (int(present[0]), int(present[-1]) + 1) if present.size else (0, 1)
        where[numpy_axis] = slice(start, stop)
        offset[2 - numpy_axis] = start
    return (offset[0], offset[1], offset[2]), np.ascontiguousarray(labels[tuple(where)])


def _decode_with_points(stack: SliceStack, embeddings: np.ndarray, boxes: np.ndarray,
                        entries: Sequence[SegmentEntry]) -> np.ndarray:
    """As ``SliceStack.decode`` for boxes with the same number of points; points map to the view like box corners."""
    view, shape = stack.view, stack.shape
    view_boxes = np.array([view.box_to_view(b, shape) for b in boxes])
    view_points = np.array([[view.box_to_view([x, y, x, y], shape)[:2] for x, y in e.points] for e in entries])
    labels = np.array([e.point_labels for e in entries])
    probabilities = stack.model.decode(embeddings, view_boxes, view.view_shape(shape), view_points, labels)
    return np.stack([view.from_view(p) for p in probabilities])


def _points(entry: dict, shape: tuple[int, int], limit: int, where: str):
    if "points" not in entry:
        if "point_labels" in entry:
            raise InputError(f"{where}: 'point_labels' without 'points'")
        return None, None
    try:
        points = np.asarray(entry["points"], dtype=np.float64)
    except (TypeError, ValueError):
        points = np.empty((0, 3))
    if points.ndim != 2 or points.shape[1:] != (2,) or not 1 <= len(points) <= limit or not np.isfinite(points).all():
        raise InputError(f"{where}: 'points' is a list of 1..{limit} [u, v] pairs, got {entry['points']!r}")
    rows, cols = shape
    if (points < 0).any() or (points[:, 0] > cols - 1).any() or (points[:, 1] > rows - 1).any():
        raise InputError(f"{where}: a point lies outside the {cols}x{rows} slice")
    labels = entry.get("point_labels", [1] * len(points))
    if not isinstance(labels, list) or len(labels) != len(points) or \
            not all(v in (0, 1) and not isinstance(v, bool) for v in labels):
        raise InputError(f"{where}: 'point_labels' is one 1 (inside) or 0 (outside) per point, got {labels!r}")
    return points, np.array(labels, dtype=np.int64)


def _no_unknown(raw: dict, allowed: set, where: str) -> None:
    unknown = sorted(map(str, set(raw) - allowed))
    if unknown:
        raise InputError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {', '.join(sorted(allowed))}")


def _int(value: Any, low: int, high: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{what} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{what} {value} is out of range {low}..{high}")
    return value


def _axis(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2, got {value!r}")
    return value


def _orientation(value: Any) -> str:
    if value not in ORIENTATIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {value!r}")
    return value
