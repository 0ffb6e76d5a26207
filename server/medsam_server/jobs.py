"""Background jobs (prefetch, annotate): their states, progress and result, and waiting for them to end.

A job goes ``queued -> running -> done | failed | cancelled``. It runs on a thread; the
event loop waits for its end on an asyncio future that :meth:`Job.finish` resolves
(no polling). A failed job keeps its exception, which ``api.py`` maps to a status code
like any other error.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from .errors import Busy, Cancelled, InputError, UnknownJob, WireError, capped

log = logging.getLogger(__name__)

FINISHED_JOBS_KEPT = 8
#: An annotate job whose status nobody asked for this long is cancelled: its client went away.
UNWATCHED_JOB_SECONDS = 120.0
#: Errors whose message is meant for the user; any other failure is reported as an internal error.
USER_ERRORS = (InputError, WireError, Cancelled)


@dataclass
class Job:
    """A background run that a client polls, fetches and may cancel."""

    kind: str
    session_id: str
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = "queued"
    phase: str = ""
    done: int = 0
    total: int = 0
    error: Optional[BaseException] = None
    result: Optional[bytes] = None  # an envelope (annotate)
    cached: int = 0  # slices found embedded already (in this owner's cache)
    created: float = field(default_factory=time.monotonic)
    ended: Optional[float] = None
    watched: float = field(default_factory=time.monotonic)  # when a client last asked for its status
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _waiters: list = field(default_factory=list)

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

    def start(self) -> None:
        with self.lock:
            self.state = "running"

    def finish(self, error: Optional[BaseException] = None, result: Optional[bytes] = None) -> None:
        with self.lock:
            if isinstance(error, Cancelled) or (error is None and self.cancel.is_set() and result is None):
                self.state = "cancelled"
            elif error is not None:
                self.state, self.error = "failed", error
            else:
                self.state, self.result = "done", result
            self.ended = time.monotonic()
            self.finished.set()
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, timeout: float) -> None:
        """Return when the job has ended or after ``timeout`` seconds, whichever comes first."""
        self.watched = time.monotonic()
        if timeout <= 0 or not self.active:
            return
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.lock:
            if self.finished.is_set():
                return
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            with self.lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))

    def error_message(self) -> Optional[str]:
        """What went wrong, capped like a request's error (a job's error may quote a huge value too)."""
        if self.error is None:
            return None
        if isinstance(self.error, USER_ERRORS):
            return capped(str(self.error))
        return capped(f"internal error ({type(self.error).__name__}): {self.error}")

    def status(self) -> dict:
        with self.lock:
            end = self.ended if self.ended is not None else time.monotonic()
            return {"job": self.id, "kind": self.kind, "state": self.state, "phase": self.phase, "done": self.done,
                    "total": self.total, "cached": self.cached, "error": self.error_message(),
                    "seconds": round(end - self.created, 3)}


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def run_job(job: Job, work: Callable[[Job], Optional[bytes]]) -> None:
    """Run ``work(job)`` (on a pool thread) and finish the job with its result or its error."""
    try:
        if job.cancel.is_set():
            raise Cancelled("cancelled before it started")
        job.start()
        job.finish(result=work(job))
    except Exception as err:  # noqa: BLE001 - the job reports every failure to its poller
        if not isinstance(err, USER_ERRORS):
            log.error("%s job %s failed", job.kind, job.id, exc_info=err)
        job.finish(err)


class JobBook:
    """One session's jobs: at most ``max_active`` running, the last few finished ones kept for their results."""

    def __init__(self, session_id: str, max_active: int):
        self.session_id = session_id
        self.max_active = max_active
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def new(self, kind: str) -> Job:
        with self._lock:
            active = sum(job.active for job in self._jobs.values())
            if active >= self.max_active:
                raise Busy(f"the session already runs {active} jobs; wait for one or cancel it")
            finished = [j for j in self._jobs.values() if not j.active]
            for old in finished[:max(0, len(finished) - FINISHED_JOBS_KEPT + 1)]:
                del self._jobs[old.id]
            job = Job(kind, self.session_id)
            self._jobs[job.id] = job
            return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"unknown job {job_id[:64]!r} for this session")
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    @property
    def busy(self) -> bool:
        return any(job.active for job in self.all())

    def cancel_all(self) -> None:
        for job in self.all():
            job.cancel.set()

    def cancel_unwatched(self, now: float) -> int:
        """Cancel the annotate jobs no client has polled for ``UNWATCHED_JOB_SECONDS``; how many."""
        unwatched = [job for job in self.all() if job.kind == "annotate" and job.active and not job.cancel.is_set()
                     and now - job.watched > UNWATCHED_JOB_SECONDS]
        for job in unwatched:
            log.info("annotate job %s cancelled: nobody asked for it for %.0f s", job.id[:6], now - job.watched)
            job.cancel.set()
        return len(unwatched)
