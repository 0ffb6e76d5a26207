"""Server sessions: an uploaded volume, who may use it, and how long it is kept.

A session holds one volume (never written to disk) and is reached by its id plus a
secret *key* returned once at upload (sent in a header, so it never shows in a URL
or an access log). When the server has tokens, the session also belongs to the
token that created it: another token gets "unknown session" even with the key.
Sessions expire after an idle time; an explicit delete also forgets the volume's
embeddings (unless another session holds the same volume).

Per owner and in all, the store caps how many sessions and how many bytes of volumes it holds
(uploads being decoded count too). The work done on a session (segment, threshold, prefetch,
annotate) is ``session_work.SessionWork``, which :class:`Sessions` inherits.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import wire
from .embeddings import EmbeddingCache, volume_digest
from .errors import Busy, UnknownSession, WireError
from .intensity import check_finite
from .jobs import JobBook
from .protocol import IMAGE_DTYPES, Limits
from .session_work import SessionWork
from .worker import ModelWorker

log = logging.getLogger(__name__)


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


class Sessions(SessionWork):
    """All sessions of a server: the store, and (inherited) the work on them; thread-safe, blocking (call from
    worker threads)."""

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
